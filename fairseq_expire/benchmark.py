"""Speed and memory of expire_span_lm against fixed_span_lm, adaptive_span_lm and compressive_lm (the paper's
Table 4 columns: time per batch, peak memory, memory kept), side by side in one run at equal L. The compressive
model's L is its reach n_mem + c * n_cmem, with n_mem = M and c = 4 (the paper's 8.5K: 512 + 4 x 2K).

Each measurement runs in its own subprocess so that peak memory is its own. Peak memory is CUDA's max allocated;
on a CPU, the peak RSS above the RSS of the process with its libraries loaded (torch, fairseq), measured in a second
subprocess of a few untimed batches in which glibc returns every freed block of 1 MiB or more to the system at
once (``MALLOC_MMAP_THRESHOLD_``), so that, like CUDA's figure, it follows the live tensors, not what malloc keeps
for later. That setting slows training, hence the separate pass; the timed run's own peak RSS, libraries and
malloc's retention included, is ``peak_rss_mb`` in the JSON. Generation rows (small allocations) take the peak
of their timed run, above the libraries.
Training: forward + backward + Adam step on a stream of tokens, carrying the memory across blocks; evaluation:
forward only, with and without the cached memory keys/values; the cached run also times a twin without the
cache, alternating blocks in one process ("cache speed-up"; its peak memory includes the twin), next to the most
it could be by multiply-add count ("bound"). Runs start at steady state (the memory is prefilled with what a long
stream leaves in it), then ``--warmup`` blocks are not timed. For each expire-span run, a fixed-span run with
L = its measured mean span S (at least the block M) shows whether cost follows the memory kept. Generation
(``--modes generate``, one stream): tokens read one at a time from the prefilled memory, each through the output
layer, timed per token ("ms/batch" is then ms per token); for expire-span also "generate-recompute", the way
without incremental decoding: the whole unfinished block run again for every new token. Prints a Markdown table
and writes JSON (the README compares the figures with the authors' implementation).

``--attention-kernels plain fused`` measures each row through both training attentions (``--attention-kernel``),
side by side: the fused row gives its tokens/s and peak memory as ratios to the plain row, and every row the bytes
per layer that :func:`attention_bytes_per_layer` predicts for what training attention keeps for the backward; the
table is followed by that model's prediction per GPU at the paper's enwik8 batch.

``--dtypes fp32 bf16`` measures each row in both, side by side: bf16 as ``fairseq-train --bf16`` runs it (the model
converted to bf16, fairseq's FP16Optimizer with fp32 master weights; not autocast), with its tokens/s and peak
memory as ratios to the fp32 row. Training rows also give model FLOP/s (multiply-adds counted as in
:func:`train_flops_per_token`) and their utilization (MFU) of the machine's matmul peak in the row's dtype, which
the run measures first (:func:`matmul_peak_tflops`; ``--peak-tflops`` to give a data-sheet figure instead).
``--memory-efficient-bf16`` trains the bf16 rows as ``fairseq-train --memory-efficient-bf16`` does instead.

    python scripts/benchmark.py --lengths 1024 4096 16384 --json bench.json
    python scripts/benchmark.py --lengths 65536 --modes train --memory-limit-gb 8    # does it fit?
    python scripts/benchmark.py --lengths 16384 --modes train --models expire_span_lm --no-follow --dtypes fp32 bf16
    python scripts/benchmark.py --lengths 16384 --modes generate                     # tokens/s generated
    python scripts/benchmark.py --lengths 16384 --modes train --models expire_span_lm --no-follow \
        --attention-kernels plain fused                                              # kernels side by side
"""

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

from fairseq_expire.cli import script_parser

CONFIGS = {
    # The CPU comparison point: 4 layers, 256 wide, 4 heads, block 256, batch 8, R = 64, p = 0.1.
    "cpu_small": dict(layers=4, width=256, ffn=1024, heads=4, block=256, batch=8, ramp=64, init=0.1),
    # The paper's enwik8 model at its per-GPU batch (64 streams of 512): for GPUs.
    "enwik8": dict(layers=12, width=512, ffn=2048, heads=8, block=512, batch=64, ramp=128, init=0.1),
    "tiny": dict(layers=2, width=32, ffn=64, heads=2, block=16, batch=2, ramp=8, init=0.1),
}

# --dtypes: the torch dtype of each
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def threads() -> int:
    """Threads of every measurement: OMP_NUM_THREADS, or all CPUs."""
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))


def matmul_peak_tflops(device, dtype: str, repeats: int = 5) -> float:
    """The best TFLOP/s of square matmuls in ``dtype`` on ``device`` (n = 8192 on a GPU, 2048 on a CPU): the peak
    that MFU is measured against, so that it is this machine's, in the row's dtype (AMX makes bf16 several times
    fp32 on a recent Xeon)."""
    import torch

    torch.set_num_threads(threads())
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, DTYPES[dtype])) for _ in range(2))
    best = math.inf
    for k in range(repeats + 2):  # two warm-ups
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        if k >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def prefill(decoder, batch_size: int, init_percentage: float, like) -> None:
    """Memory as at steady state: the last N positions (random layer inputs), the last M of them the previous
    block. Fixed span: N = L. Expire-span and Adaptive-Span: the entries their initial spans p * L keep,
    N = p * L + R (expire-spans start at p * L: w = 0, so they do not depend on the input). Compressive:
    N = n_mem + n_cmem (every entry is attended, so their distances do not change the cost)."""
    import torch

    from fairseq_expire.modules.expire_span import LayerMemory

    rule, H = decoder.rule, like.size(-1)
    N = rule.max_span
    if rule.learned:
        N = max(decoder.block_size, min(N, math.ceil(init_percentage * rule.max_span) + rule.ramp))
    if hasattr(decoder, "memory_sizes"):
        N = decoder.memory_sizes[0] + decoder.memory_sizes[1]
    distance = torch.arange(N, 0, -1, dtype=torch.float32, device=like.device).expand(batch_size, -1)
    decoder.set_memory(
        [
            LayerMemory(
                hidden=torch.randn(batch_size, N, H, device=like.device, dtype=like.dtype),
                distance=distance,
                valid=torch.ones(batch_size, N, dtype=torch.bool, device=like.device),
            )
            for _ in decoder.layers
        ]
    )


def cache_bound(cfg: dict, mem_per_layer, vocabulary_size: int) -> float:
    """Multiply-adds per block without the cache over those with it: the most the cache can speed evaluation up
    if every operation ran at the same efficiency. Per layer, with N memories and T = N + M keys: projections and
    feed-forward of the block, attention to T keys and the position band; without the cache, also the keys and
    values of the N memories."""
    B, M, H, F = cfg["batch"], cfg["block"], cfg["width"], cfg["ffn"]
    cached = uncached = B * M * H * vocabulary_size  # output layer
    for N in mem_per_layer:
        block = B * M * (4 * H * H + 2 * H * F + 2 * (N + M) * H + M * H)
        cached += block
        uncached += block + 2 * B * N * H * H
    return uncached / cached


def train_flops_per_token(cfg: dict, mem_per_layer, vocabulary_size: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 forwards, 2 FLOPs a multiply-add): per layer the
    projections and feed-forward, attention to the N memories and the M block keys, the position band; the output
    layer."""
    M, H, F = cfg["block"], cfg["width"], cfg["ffn"]
    multiply_adds = H * vocabulary_size + sum(
        4 * H * H + 2 * H * F + 2 * (N + M) * H + M * H for N in mem_per_layer
    )
    return 3 * 2 * multiply_adds


# The paper's enwik8 training per GPU (batch 512 on 8 GPUs): 64 streams, 8 heads, blocks of M = 512, about 2K
# memories kept (Table 4), 12 layers, H = 512.
ENWIK8_PER_GPU = dict(batch=64, heads=8, block=512, keys=2048 + 512, width=512, layers=12)


def attention_bytes_per_layer(
    kernel: str, B: int, K: int, M: int, T: int, D: int, H: int, size: int = 4
) -> int:
    """What one layer's training attention keeps for the backward, in bytes (``size``: bytes per element of the
    model's dtype; H = K * D). Both paths keep q and the output (B x M x H each) and the per-key ``r`` (B x T,
    fp32). The plain path adds the keys and values of all T positions (B x T x H each), the probabilities of
    every head, query and key (B x K x M x T) and the position band's scores (B x K x M x 2M); the fused path
    only the log-sum-exp (B x K x M, fp32), since it projects the keys and values again from the layer inputs
    that the projections keep in both paths (not counted)."""
    assert H == K * D
    common = size * 2 * B * M * H + 4 * B * T
    if kernel == "fused":
        return common + 4 * B * K * M
    return common + size * (2 * B * T * H + B * K * M * (T + 2 * M))


def predicted_row_mb(row: dict, cfg: dict) -> float:
    """:func:`attention_bytes_per_layer` at the run's B, K, M, H and its mean T (keys kept + M), in MB."""
    kept = sum(row["mem_per_layer"]) / len(row["mem_per_layer"])
    B, K, M, H = cfg["batch"], cfg["heads"], cfg["block"], cfg["width"]
    size = 2 if row["dtype"] == "bf16" else 4
    return (
        attention_bytes_per_layer(row["attention_kernel"], B, K, M, round(kept) + M, H // K, H, size) / 2**20
    )


def enwik8_prediction(kernels, dtype: str) -> str:
    """The memory model per GPU at the paper's enwik8 batch, all layers, for each kernel."""
    c = ENWIK8_PER_GPU
    size = 2 if dtype == "bf16" else 4
    shape = (c["batch"], c["heads"], c["block"], c["keys"], c["width"] // c["heads"], c["width"])
    figures = ", ".join(
        f"{kernel} {c['layers'] * attention_bytes_per_layer(kernel, *shape, size) / 2**30:.1f} GiB"
        for kernel in kernels
    )
    return (
        f"memory model at the paper's enwik8 batch per GPU ({c['batch']} streams, {c['heads']} heads, "
        f"M = {c['block']}, T = {c['keys']} keys, {c['layers']} layers, H = {c['width']}, {dtype}): training "
        f"attention keeps {figures} for the backward"
    )


def build_optimizer(model, dtype, memory_efficient: bool = False):
    """fairseq's Adam as ``fairseq-train`` builds it: wrapped in FP16Optimizer (fp32 master weights, no loss scaling
    in bf16) when the model is in bf16, or (``memory_efficient``: ``--memory-efficient-bf16``) in
    MemoryEfficientFP16Optimizer, which keeps no fp32 copy of the weights and gradients (Adam's state stays fp32).
    """
    import torch
    from fairseq import optim
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.optim.adam import FairseqAdamConfig
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(FairseqConfig())
    cfg.common.bf16 = dtype == torch.bfloat16
    cfg.common.memory_efficient_bf16 = cfg.common.bf16 and memory_efficient
    cfg.optimizer = OmegaConf.merge(OmegaConf.structured(FairseqAdamConfig(lr=[1e-4])), {"_name": "adam"})
    params = list(model.parameters())
    if cfg.common.memory_efficient_bf16:
        return optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
    if cfg.common.bf16:
        return optim.FP16Optimizer.build_optimizer(cfg, params)
    return optim.build_optimizer(cfg.optimizer, params)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM)


def _status_mb(field: str) -> Optional[float]:
    """A memory figure of /proc/self/status (Linux), in MB."""
    if os.path.exists("/proc/self/status"):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def peak_memory_mb(device) -> float:
    """CUDA max allocated, or the peak RSS since the last reset (Linux) or since the start."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# glibc: blocks of at least this many bytes are mmap-ed, so freeing one returns it to the system (memory pass only)
RELEASING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
MEMORY_PASS_BATCHES = 2


def measure(args) -> dict:
    """One configuration, in this process."""
    import torch
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    import fairseq_expire  # noqa: F401  (registers the models)

    if args.memory_limit_gb:
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cfg = run_config(args)
    device = torch.device(args.device)
    # CPU peaks are given above what the imports hold, read before the model exists (CUDA's count only tensors)
    libraries_mb = 0.0 if device.type == "cuda" else _status_mb("VmRSS") or 0.0
    torch.manual_seed(0)
    dictionary = Dictionary()
    for i in range(252):
        dictionary.add_symbol(str(i))
    options = dict(
        tokens_per_sample=cfg["block"],
        decoder_layers=cfg["layers"],
        decoder_embed_dim=cfg["width"],
        decoder_ffn_embed_dim=cfg["ffn"],
        decoder_attention_heads=cfg["heads"],
        dropout=0.0,
        attention_dropout=0.0,
        attention_kernel=args.attention_kernel,
        **memory_options(args.model, cfg, args.max_span),
    )
    model_class = ARCH_MODEL_REGISTRY[args.model]
    config = getattr(model_class, "__dataclass")(**options)
    dtype = getattr(torch, DTYPES[args.dtype])
    model = model_class.build_model(config, SimpleNamespace(target_dictionary=dictionary)).to(device, dtype)
    optimizer = build_optimizer(model, dtype, args.memory_efficient_bf16)
    B, M = cfg["batch"], cfg["block"]
    stream = torch.randint(4, len(dictionary), (B, (args.warmup + args.batches + 1) * M), device=device)
    if args.mode == "eval":
        model.eval()
        model.decoder.cache_projections_in_eval = args.eval_cache
    else:
        model.train()
    if args.mode.startswith("generate"):
        model.eval()
        prefill(model.decoder, B, cfg["init"], model.decoder.embed_tokens.weight)
        generation = measure_generation(args, model, device)
        generation["peak_memory_mb"] -= libraries_mb
        return {**identity(args), "device": str(device), **generation}
    prefill(model.decoder, B, cfg["init"], model.decoder.embed_tokens.weight)
    # Evaluation with the cache is also timed against a twin without it, block by block in this process, so
    # that the speed-up is not a comparison of two moments of a shared machine.
    twin = None
    if args.mode == "eval" and args.eval_cache:
        twin = copy.deepcopy(model)
        twin.decoder.cache_projections_in_eval = False
    twin_times = []

    def synchronize():
        _synchronize(device)

    times, spans, kept = [], [], []
    for k in range(args.warmup + args.batches):
        if k == args.warmup:
            reset_peak_memory(device)
        tokens = stream[:, k * M : (k + 1) * M]
        target = stream[:, k * M + 1 : (k + 1) * M + 1]
        synchronize()
        start = time.perf_counter()
        if args.mode == "eval":
            with torch.no_grad():
                logits, extra = model(tokens)
        else:
            logits, extra = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
            optimizer.backward(loss + 1e-6 * (extra["span_loss"] + extra.get("adaptive_span_loss", 0)))
            optimizer.step()
            optimizer.zero_grad()
        synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
            spans.append(float(extra["span_avg"]))
            kept.append([float(x) for x in extra["mem_per_layer"]])
        if twin is not None:
            start = time.perf_counter()
            with torch.no_grad():
                twin(tokens)
            synchronize()
            if k >= args.warmup:
                twin_times.append(time.perf_counter() - start)
    peak_mb = peak_memory_mb(device)
    batch_time = statistics.median(times)
    mem_per_layer = [round(statistics.mean(layer), 1) for layer in zip(*kept)]
    flops = None
    if args.mode == "train":
        flops = train_flops_per_token(cfg, mem_per_layer, len(dictionary)) * B * M / batch_time
    return {
        **identity(args),
        "device": str(device),
        "tokens_per_s": B * M / batch_time,
        "batch_time_ms": 1000 * batch_time,
        "peak_memory_mb": peak_mb - libraries_mb,
        **({} if device.type == "cuda" else {"peak_rss_mb": peak_mb}),
        "span_avg": statistics.mean(spans),
        "mem_per_layer": mem_per_layer,
        **({"model_tflops": flops / 1e12} if flops else {}),
        **(
            {
                "cache_speedup": statistics.median(twin_times) / batch_time,
                "cache_bound": cache_bound(cfg, mem_per_layer, len(dictionary)),
            }
            if twin_times
            else {}
        ),
    }


def measure_generation(args, model, device) -> dict:
    """Tokens read one at a time after the prefilled memory, each to its next-token logits: incrementally
    (``generate``), or by running the unfinished block again for every token (``generate-recompute``)."""
    import torch

    from fairseq_expire.models.expire_span_lm import DecodingState

    decoder, M = model.decoder, model.decoder.block_size
    tokens = torch.randint(4, len(decoder.dictionary), (1, args.warmup + args.generate_tokens), device=device)
    state = DecodingState(memories=decoder.memory())
    block = torch.full((1, M), decoder.dictionary.pad(), device=device)
    committed = decoder.memory()  # recompute: the memory at the last block boundary
    times, extra = [], None
    with torch.no_grad():
        for k in range(tokens.size(1)):
            if k == args.warmup:
                reset_peak_memory(device)
            _synchronize(device)
            start = time.perf_counter()
            if args.mode == "generate":
                features, extra = decoder.read(tokens[:, k : k + 1], state)
                decoder.output_layer(features)
            else:
                t = k % M
                block[:, t] = tokens[:, k]
                decoder.set_memory(committed)
                _, extra = model(block)
                if t == M - 1:
                    committed = decoder.memory()
            _synchronize(device)
            if k >= args.warmup:
                times.append(time.perf_counter() - start)
    token_time = statistics.median(times)
    if args.mode == "generate":
        spans = [m.spans[m.valid] for m in state.memories if m.spans is not None]
        span = float(torch.cat(spans).mean()) if spans else float(decoder.rule.max_span)
    else:
        span = float(extra["span_avg"])
    return {
        "tokens_per_s": 1 / token_time,
        "batch_time_ms": 1000 * token_time,
        "peak_memory_mb": peak_memory_mb(device),
        "span_avg": span,
        "mem_per_layer": [round(float(x), 1) for x in extra["mem_per_layer"]],
    }


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_options(model: str, cfg: dict, max_span: int) -> dict:
    """How each model is given the maximum span L (expire-span and Adaptive-Span start at p * L)."""
    if model == "compressive_lm":
        return dict(mem_size=cfg["block"], cmem_size=(max_span - cfg["block"]) // 4, compression_rate=4)
    if model == "adaptive_span_lm":
        return dict(max_span=max_span, adaptive_span_ramp=cfg["ramp"], adaptive_span_init=cfg["init"])
    if model == "expire_span_lm":
        return dict(max_span=max_span, expire_span_ramp=cfg["ramp"], expire_span_init_percentage=cfg["init"])
    return dict(max_span=max_span)


def run_config(args) -> dict:
    """The configuration a run measures: ``--config``, with ``--streams`` if given (one stream to generate)."""
    cfg = CONFIGS[args.config]
    if args.mode.startswith("generate"):
        return {**cfg, "batch": 1}
    return {**cfg, "batch": args.streams} if args.streams else cfg


def identity(args) -> dict:
    return {
        "config": args.config,
        "streams": run_config(args)["batch"],
        "model": args.model,
        "mode": args.mode + ("+cache" if args.mode == "eval" and args.eval_cache else ""),
        "max_span": args.max_span,
        "dtype": args.dtype,
        "memory_efficient_bf16": args.dtype == "bf16" and args.memory_efficient_bf16,
        "attention_kernel": args.attention_kernel,
    }


def run_in_subprocess(args, **overrides) -> dict:
    """One row: its timed run, and on a CPU its peak memory from a memory pass (see the module doc)."""
    row = _measurement(args, overrides)
    if (
        row.get("out_of_memory")
        or args.device != "cpu"
        or overrides.get("mode", args.mode).startswith("generate")
    ):
        return row
    passes = {**overrides, "warmup": 1, "batches": MEMORY_PASS_BATCHES}
    memory = _measurement(args, passes, RELEASING_MALLOC)
    return memory if memory.get("out_of_memory") else {**row, "peak_memory_mb": memory["peak_memory_mb"]}


def _measurement(args, overrides: dict, environment: Optional[dict] = None) -> dict:
    command = [sys.executable, "-m", "fairseq_expire.benchmark", "--measure"]
    for key, value in {**vars(args), **overrides}.items():
        if key in (
            "measure",
            "json",
            "lengths",
            "models",
            "modes",
            "no_follow",
            "dtypes",
            "attention_kernels",
        ):
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            command += [f"--{key.replace('_', '-')}"] if value else []
        else:
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads()),
        **(environment or {}),
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ratios(row, reference) -> str:
    """Tokens/s (peak memory) of ``row`` over ``reference``'s."""
    if not reference or reference.get("out_of_memory"):
        return ""
    return (
        f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x "
        f"({row['peak_memory_mb'] / reference['peak_memory_mb']:.2f}x)"
    )


def markdown(rows) -> str:
    """One line per row; a bf16 row also gives its tokens/s and peak memory over the fp32 row measured with it, a
    fused-kernel row over the plain-kernel row."""
    lines = [
        "| model | mode | L | dtype | kernel | tokens/s | vs fp32 (peak mem) | vs plain (peak mem) "
        "| ms/batch | peak MB | predicted MB/layer | span avg | memory/layer | cache speed-up (bound) "
        "| model TFLOP/s (MFU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernel = r["attention_kernel"] if r["mode"] == "train" else ""
        dtype = r["dtype"] + (", memory-efficient" if r.get("memory_efficient_bf16") else "")
        head = f"| {r['model']} | {r['mode']} | {r['max_span']} | {dtype} | {kernel} |"
        if r.get("out_of_memory"):
            lines.append(f"{head} out of memory ({r['memory_limit_gb']} GB limit) | | | | | | | | | |")
            continue
        memory = sum(r["mem_per_layer"]) / len(r["mem_per_layer"])
        predicted = (
            f"{predicted_row_mb(r, {**CONFIGS[r['config']], 'batch': r['streams']}):.1f}"
            if r["mode"] == "train"
            else ""
        )
        speedup = f"{r['cache_speedup']:.2f}x ({r['cache_bound']:.2f}x)" if "cache_speedup" in r else ""
        utilization = ""
        if "model_tflops" in r:
            utilization = f"{r['model_tflops']:.3g} ({100 * r['mfu']:.2g}%)"
        lines.append(
            f"{head} {r['tokens_per_s']:.0f} | {_ratios(r, r.get('fp32'))} | {_ratios(r, r.get('plain'))} "
            f"| {r['batch_time_ms']:.0f} | {r['peak_memory_mb']:.0f} | {predicted} | {r['span_avg']:.0f} "
            f"| {memory:.0f} | {speedup} | {utilization} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = script_parser("benchmark.py", __doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu_small")
    parser.add_argument("--streams", type=int, help="streams per batch B (default: the configuration's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="max spans L")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["expire_span_lm", "fixed_span_lm", "adaptive_span_lm", "compressive_lm"],
        choices=["expire_span_lm", "fixed_span_lm", "adaptive_span_lm", "compressive_lm"],
    )
    parser.add_argument(
        "--modes", nargs="+", default=["train", "eval"], choices=["train", "eval", "generate"]
    )
    parser.add_argument("--batches", type=int, default=8, help="timed batches (median reported)")
    parser.add_argument(
        "--generate-tokens", type=int, default=64, help="generate: timed tokens (median per token reported)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (after the prefill)")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        help="address-space limit per run: a run that needs more is out of memory",
    )
    parser.add_argument(
        "--no-follow", action="store_true", help="skip the fixed-span runs at L = expire-span's mean span"
    )
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["fp32"],
        help="each row in each, side by side",
    )
    parser.add_argument(
        "--memory-efficient-bf16",
        action="store_true",
        help="bf16 rows train as fairseq-train --memory-efficient-bf16 does (no fp32 master weights)",
    )
    parser.add_argument(
        "--attention-kernels", nargs="+", choices=["fused", "plain"], default=["fused"],
        help="each row through each training attention (--attention-kernel), side by side",
    )  # fmt: skip
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the peak TFLOP/s the MFU column divides by, in every dtype (default: measured per dtype)",
    )
    parser.add_argument("--json", type=Path, help="write all figures here")
    # internal: one measurement
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="expire_span_lm", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--max-span", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--eval-cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--attention-kernel", default="fused", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        try:
            row = measure(args)
        except (MemoryError, RuntimeError) as error:  # torch's CPU and CUDA allocators raise RuntimeError
            if "memory" not in str(error).lower():
                raise
            row = {**identity(args), "out_of_memory": True, "memory_limit_gb": args.memory_limit_gb}
        print(json.dumps(row))
        return

    peaks = {}
    if "train" in args.modes:
        import torch

        device = torch.device(args.device)
        for dtype in args.dtypes:
            peaks[dtype] = args.peak_tflops or matmul_peak_tflops(device, dtype)
        print(", ".join(f"matmul peak {d}: {p:.3g} TFLOP/s" for d, p in peaks.items()), flush=True)
    rows = []

    def measured(**settings):
        """The row in each of --dtypes and --attention-kernels, one after the other; the first of them (fp32 if
        asked) is returned."""
        first, measured_rows = None, {}

        def figures(row):
            return {k: row.get(k) for k in ("tokens_per_s", "peak_memory_mb", "out_of_memory")}

        # the kernels differ in training only: other modes are measured once
        kernels = args.attention_kernels if settings["mode"] == "train" else args.attention_kernels[-1:]
        for dtype in args.dtypes:
            for kernel in kernels:
                row = run_in_subprocess(args, dtype=dtype, attention_kernel=kernel, **settings)
                if "model_tflops" in row:
                    row["mfu"] = row["model_tflops"] / peaks[dtype]
                fp32 = measured_rows.get(("fp32", kernel))
                if dtype != "fp32" and fp32 is not None:
                    row["fp32"] = figures(fp32)
                plain = measured_rows.get((dtype, "plain"))
                if kernel != "plain" and plain is not None:
                    row["plain"] = figures(plain)
                measured_rows[dtype, kernel] = row
                rows.append(row)
                print(markdown([row]).splitlines()[-1], flush=True)
                first = first or row
        return first

    def measured_generation(model, length):
        row = measured(model=model, mode="generate", max_span=length, eval_cache=False)
        if model == "expire_span_lm":
            measured(model=model, mode="generate-recompute", max_span=length, eval_cache=False)
            if not args.no_follow and not row.get("out_of_memory"):
                span = max(round(row["span_avg"]), CONFIGS[args.config]["block"])  # L >= M
                measured(model="fixed_span_lm", mode="generate", max_span=span, eval_cache=False)

    for length in args.lengths:
        for model in args.models:
            for mode in args.modes:
                if mode == "generate":
                    if model != "compressive_lm":  # it has no token-by-token decoding
                        measured_generation(model, length)
                    continue
                caches = [True, False] if mode == "eval" and model == "expire_span_lm" else [mode == "eval"]
                if model == "compressive_lm":  # no cache: a compressed memory's key is that of a pooled state
                    caches = [False]
                for cache in caches:
                    row = measured(model=model, mode=mode, max_span=length, eval_cache=cache)
                    if model == "expire_span_lm" and cache == (mode == "eval") and not args.no_follow:
                        if not row.get("out_of_memory"):  # cost should follow the memory kept, not L
                            span = max(round(row["span_avg"]), CONFIGS[args.config]["block"])  # L >= M
                            measured(model="fixed_span_lm", mode=mode, max_span=span, eval_cache=cache)
    print()
    print(markdown(rows))
    if "train" in args.modes:
        for dtype in args.dtypes:
            print(enwik8_prediction(args.attention_kernels, dtype))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
