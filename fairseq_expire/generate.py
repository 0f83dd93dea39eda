"""Long generations from a checkpoint: the prompt is read in blocks, then tokens are sampled one at a time with
the expiring memory (at most L + R entries per layer however long it runs), and shown as they are made.

``scripts/generate.py`` is the command line; :func:`generate` is the loop, for use from Python.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import Tensor

from fairseq_expire.cli import add_config_options, config_from, option, script_parser
from fairseq_expire.errors import UsageError, exit_on_usage_error
from fairseq_expire.models.expire_span_lm import DecodingState


@dataclass
class GenerateConfig:
    checkpoint: Path = option(None, "a checkpoint of fairseq-train (.pt)", required=True, metavar="PT")
    data: Optional[Path] = option(
        None, "its data directory, for dict.txt and prepare.json (default: the checkpoint's)"
    )
    prompt: Optional[str] = option(None, "the text to continue")
    prompt_file: Optional[Path] = option(None, "a UTF-8 file with the text to continue")
    max_tokens: int = option(1000, "how many tokens to generate")
    seed: int = option(1, "random seed of the sampling")
    sampling_topk: int = option(0, "sample among the k most likely tokens (0: all)")
    sampling_topp: float = option(
        1.0, "sample among the fewest most likely tokens whose probability reaches p (1: all)"
    )
    temperature: float = option(1.0, "divide the log-probabilities by this")
    inference_max_span: Optional[int] = option(
        None, "cap every span at this many steps (less memory; paper Figure 10)"
    )
    cpu: bool = option(False, "run on the CPU even if there is a GPU")


def check_config(config: GenerateConfig) -> None:
    """Refuse bad options before the model is loaded."""
    if config.prompt is not None and config.prompt_file is not None:
        raise UsageError("--prompt and --prompt-file both given: pass one of them")
    if config.prompt_file is not None and not config.prompt_file.is_file():
        raise UsageError(f"--prompt-file {config.prompt_file} not found: pass a UTF-8 text file")
    if config.max_tokens < 0:
        raise UsageError(f"--max-tokens {config.max_tokens}: must be >= 0")
    if config.sampling_topk < 0:
        raise UsageError(f"--sampling-topk {config.sampling_topk}: must be >= 0 (0 samples among all tokens)")
    if not 0 < config.sampling_topp <= 1:
        raise UsageError(f"--sampling-topp {config.sampling_topp}: must be in (0, 1] (1 samples among all)")
    if config.temperature <= 0:
        raise UsageError(f"--temperature {config.temperature}: must be > 0")
    if config.inference_max_span is not None and config.inference_max_span < 1:
        raise UsageError(
            f"--inference-max-span {config.inference_max_span}: must be >= 1 (leave it out: no cap)"
        )


def next_token(log_probs: Tensor, config: GenerateConfig, forbidden: List[int], generator) -> Tensor:
    """A token drawn from ``log_probs`` (V) with temperature, top-k and top-p (nucleus) sampling."""
    logits = log_probs.float() / config.temperature
    logits[forbidden] = -float("inf")
    if config.sampling_topk:
        kth = logits.topk(min(config.sampling_topk, len(logits))).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if config.sampling_topp < 1:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= config.sampling_topp  # the mass before them already reaches p
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, -float("inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@dataclass
class Generation:
    prompt_tokens: int
    prompt_seconds: float
    tokens: int
    seconds: float
    mem_per_layer: List[float]  # entries kept at the end, per layer

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def generate(model, prompt: Tensor, config: GenerateConfig, on_token: Callable[[int], None]) -> Generation:
    """Continue ``prompt`` (N token ids; empty: start after a line end, ``</s>``) by ``config.max_tokens``
    sampled tokens, each passed to ``on_token`` as soon as it is drawn (nothing else is kept)."""
    decoder = model.decoder
    device = next(model.parameters()).device
    dictionary = decoder.dictionary
    if len(prompt) == 0:
        prompt = torch.tensor([dictionary.eos()])
    generator = torch.Generator(device=device).manual_seed(config.seed)
    # never in the data: padding, beginning of sentence, and the symbols that pad the dictionary to a multiple of 8
    padding = [i for i, symbol in enumerate(dictionary.symbols) if symbol.startswith("madeupword")]
    forbidden = [dictionary.pad(), dictionary.bos(), *padding]
    state = DecodingState()
    with torch.no_grad():
        start = time.perf_counter()
        features, _ = decoder.read(prompt.view(1, -1).to(device), state)
        features = features[:, -1:]
        read = time.perf_counter()
        for _ in range(config.max_tokens):
            log_probs = model.get_normalized_probs((decoder.output_layer(features), None), log_probs=True)
            token = next_token(log_probs[0, -1], config, forbidden, generator)
            on_token(int(token))
            features, _ = decoder.read(token.view(1, 1), state)
        done = time.perf_counter()
    return Generation(
        len(prompt), read - start, config.max_tokens, done - read, [float(m) for m in state.mem_per_layer()]
    )


def cli_main(argv: Optional[List[str]] = None) -> None:
    parser = script_parser("generate.py", __doc__)
    add_config_options(parser, GenerateConfig)
    config = config_from(parser.parse_args(argv), GenerateConfig)
    exit_on_usage_error(parser.prog, lambda: _generate_to_stdout(config))


def _generate_to_stdout(config: GenerateConfig) -> None:
    from fairseq_expire.analysis.runner import load_model

    check_config(config)
    loaded = load_model(config.checkpoint, config.data, config.inference_max_span, config.cpu)
    text = config.prompt_file.read_text(encoding="utf-8") if config.prompt_file else config.prompt or ""
    prompt = loaded.vocabulary.encode(text)
    decode = loaded.vocabulary.text_decoder()
    sys.stdout.write(text)

    def show(token: int) -> None:
        sys.stdout.write(decode(token))
        sys.stdout.flush()

    result = generate(loaded.model, prompt, config, show)
    memory = ", ".join(f"{m:.0f}" for m in result.mem_per_layer)
    sys.stdout.write("\n")
    sys.stderr.write(
        f"prompt: {result.prompt_tokens} tokens in {result.prompt_seconds:.2f} s; generated: {result.tokens} tokens "
        f"in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s); memory kept per layer: {memory} "
        f"(at most L + R = {loaded.max_span + loaded.model.decoder.rule.ramp})\n"
    )
