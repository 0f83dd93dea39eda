"""The ways in to generation, end to end on tiny checkpoints trained here: fairseq-interactive (sampling, beam
search), fairseq's hub interface, and scripts/generate.py; token-by-token log-probs against fairseq-eval-lm.
"""

import math
import re

import pytest
import torch
from console import eval_lm, eval_lm_bits, make_data_bin, repeating_text, run, train_command
from fairseq.data import Dictionary

from fairseq_expire.analysis.runner import vocabulary_of
from fairseq_expire.models.expire_span_lm import DecodingState, ExpireSpanLanguageModel
from fairseq_expire.prepare.text import TextConfig, prepare_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Expire-Span model on repeating letters (a unit of 40 said 4 times): (data, save directory)."""
    directory = tmp_path_factory.mktemp("generation")
    data = make_data_bin(directory, repeating_text(12000, 40, seed=1), repeating_text(1200, 40, seed=2))
    run("fairseq-train", *train_command(data, directory / "ckpt", "--max-span", 32, updates=40))
    return data, directory / "ckpt"


def interactive(data, checkpoint, prompt: str, *options):
    result = run(
        "fairseq-interactive", data, "--user-dir", "fairseq_expire", "--task", "language_modeling_with_memory",
        "--path", checkpoint / "checkpoint_best.pt", "--cpu", "--max-len-b", 30, *options, input=prompt + "\n",
    )  # fmt: skip
    return [line.split("\t")[2] for line in result.stdout.splitlines() if line.startswith("H-")]


def test_interactive_samples_and_beam_searches_continuations_of_the_prompt(trained):
    data, checkpoint = trained
    sampled = [
        interactive(data, checkpoint, "a b c d", "--sampling", "--sampling-topk", 5, "--temperature", 0.8,
                    "--beam", 1, "--seed", seed)[0]
        for seed in (1, 2)
    ]  # fmt: skip
    assert all(text.startswith("a b c d ") and len(text.split()) > 10 for text in sampled)
    assert sampled[0] != sampled[1]
    nucleus = interactive(data, checkpoint, "a b", "--sampling", "--sampling-topp", 0.5, "--beam", 1)
    assert nucleus[0].startswith("a b ")
    beams = interactive(data, checkpoint, "a b c d", "--beam", 4, "--nbest", 3)
    assert len(beams) == 3 and len(set(beams)) == 3 and all(b.startswith("a b c d ") for b in beams)


def test_hub_samples_and_scores_as_block_processing_does(trained):
    data, checkpoint = trained
    hub = ExpireSpanLanguageModel.from_pretrained(checkpoint, data_name_or_path=str(data))
    text = hub.sample("a b c d", beam=1, sampling=True, sampling_topk=4, max_len_b=40)
    assert text.startswith("a b c d ") and len(text.split()) > 20
    assert len(hub.sample(["a b", "c d e"], beam=3, max_len_b=10)) == 2
    sentence = " ".join(repeating_text(40, 20, seed=3))  # longer than two blocks: read in blocks, then tokens
    scored = hub.score(sentence)["positional_scores"]
    model, dictionary = hub.models[0], hub.task.dictionary
    letters = hub.encode(sentence)[:-1]  # without the </s> that encode appends
    source = torch.cat(
        [letters.new_tensor([dictionary.eos()]), letters[:-1], letters.new_full((8,), dictionary.pad())]
    )  # </s> + 39 letters, padded to three blocks
    with torch.no_grad():
        logits = torch.cat([model(source[None, k : k + 16], reset_memory=k == 0)[0] for k in (0, 16, 32)], 1)
    log_probs = model.get_normalized_probs((logits[:, :40], None), log_probs=True)[0]
    torch.testing.assert_close(scored, log_probs.gather(-1, letters[:, None])[:, 0], atol=1e-5, rtol=0)


def test_token_by_token_log_probs_equal_eval_lm(trained):
    """fairseq-eval-lm reads the valid split as one stream in blocks; reading it token by token gives the same
    mean loss (eval-lm prints 4 decimals; per token the two agree to 1e-5, tests/test_generation.py)."""
    data, checkpoint = trained
    result = eval_lm(data, checkpoint / "checkpoint_best.pt", "--batch-size", 1, "--tokens-per-sample", 16)
    eval_lm_loss = eval_lm_bits(result.stdout + result.stderr)
    hub = ExpireSpanLanguageModel.from_pretrained(checkpoint)  # the data directory recorded in the checkpoint
    model = hub.models[0]
    hub.task.load_dataset("valid")
    stream = hub.task.dataset("valid").tokens
    tokens = stream.read(0, len(stream))
    state, nll = DecodingState(), []
    with torch.no_grad():
        for i in range(len(tokens) - 1):
            features, _ = model.decoder.read(tokens[None, i : i + 1], state)
            log_probs = model.get_normalized_probs(
                (model.decoder.output_layer(features), None), log_probs=True
            )
            nll.append(-float(log_probs[0, 0, tokens[i + 1]]))
            assert state.mem_per_layer().max() <= 32 + 8  # L + R
    assert sum(nll) / len(nll) / math.log(2) == pytest.approx(eval_lm_loss, abs=1e-4)


def test_generate_script_streams_text_and_reports_speed_and_memory(trained):
    data, checkpoint = trained
    command = ["scripts/generate.py", "--checkpoint", checkpoint / "checkpoint_best.pt", "--data", data]
    sampling = ["--prompt", "abcd", "--max-tokens", 300, "--sampling-topp", 0.9, "--seed", 3, "--cpu"]
    result = run("python", *command, *sampling)
    assert result.stdout.startswith("abcd") and len(result.stdout) >= 4 + 300 + 1  # a token: >= 1 character
    assert re.search(r"generated: 300 tokens in [0-9.]+ s \([0-9.]+ tokens/s\)", result.stderr)
    kept = [
        int(k) for k in re.search(r"memory kept per layer: ([0-9, ]+)", result.stderr).group(1).split(", ")
    ]
    assert len(kept) == 2 and all(0 < k <= 32 + 8 for k in kept)
    assert run("python", *command, *sampling).stdout == result.stdout  # the seed decides
    refused = run(
        "python", "scripts/generate.py", "--checkpoint", checkpoint / "checkpoint_best.pt",
        "--sampling-topp", 0, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "generate.py: error: --sampling-topp 0.0: must be in (0, 1] (1 samples among all)"
    )


@pytest.mark.parametrize("tokenizer", ["bytes", "chars", "spm"])
def test_generated_tokens_are_decoded_to_text_as_the_preparation_encoded_it(tokenizer, tmp_path):
    words = "the cat sat on a mat and then the dog ran far away from home, café".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 4)) for i in range(200)]
    for split, part in (("train", lines[:150]), ("valid", lines[150:180]), ("test", lines[180:])):
        (tmp_path / f"{split}.txt").write_text("\n".join(part) + "\n")
    out = tmp_path / "out"
    prepare_text(
        TextConfig(
            out=out,
            train=[tmp_path / "train.txt"],
            valid=[tmp_path / "valid.txt"],
            test=[tmp_path / "test.txt"],
            tokenizer=tokenizer,
            spm_vocab_size=24,
        )
    )
    vocabulary = vocabulary_of(out, Dictionary.load(str(out / "dict.txt")))
    text = "\n".join(lines[150:160]) + "\n"
    decode = vocabulary.text_decoder()  # token by token, as generated
    assert "".join(decode(i) for i in vocabulary.encode(text).tolist()) == text
