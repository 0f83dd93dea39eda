#!/usr/bin/env python3
"""Speed and memory of expire_span_lm against fixed_span_lm, adaptive_span_lm and compressive_lm (the paper's
Table 4 columns: time per batch, peak memory, memory kept), side by side in one run at equal L. The compressive
model's L is its reach n_mem + c * n_cmem, with n_mem = M and c = 4 (the paper's 8.5K: 512 + 4 x 2K).

Each measurement runs in its own subprocess so that peak memory (CPU RSS, or CUDA max allocated) is its own.
Training: forward + backward + Adam step on a stream of tokens, carrying the memory across blocks; evaluation:
forward only, with and without the cached memory keys/values; the cached run also times a twin without the
cache, alternating blocks in one process ("cache speed-up"; its peak memory includes the twin), next to the most
it could be by multiply-add count ("bound"). Runs start at steady state (the memory is prefilled with what a long
stream leaves in it), then ``--warmup`` blocks are not timed. For each expire-span run, a fixed-span run with
L = its measured mean span S (at least the block M) shows whether cost follows the memory kept. Prints a
Markdown table, with the ratio to the authors' implementation where the issue gives its figure, and writes JSON.

    python scripts/benchmark.py --lengths 1024 4096 16384 --json bench.json
    python scripts/benchmark.py --lengths 65536 --modes train --memory-limit-gb 8    # does it fit?
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

CONFIGS = {
    # The CPU comparison point: 4 layers, 256 wide, 4 heads, block 256, batch 8, R = 64, p = 0.1.
    "cpu_small": dict(layers=4, width=256, ffn=1024, heads=4, block=256, batch=8, ramp=64, init=0.1),
    "tiny": dict(layers=2, width=32, ffn=64, heads=2, block=16, batch=2, ramp=8, init=0.1),
}

# The authors' implementation (facebookresearch/transformer-sequential) on cpu_small, training tokens/s on this
# project's 2-core CPU machine, as measured for the efficiency issue: (model, L) -> tokens/s.
AUTHORS_TRAIN_TOKENS_PER_S = {
    ("expire_span_lm", 1024): 2896,
    ("expire_span_lm", 4096): 2168,
    ("expire_span_lm", 16384): 535,
    ("fixed_span_lm", 1024): 1202,
}


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
    decoder._memory[decoder.training] = [
        LayerMemory(
            hidden=torch.randn(batch_size, N, H, device=like.device),
            distance=distance,
            valid=torch.ones(batch_size, N, dtype=torch.bool, device=like.device),
        )
        for _ in decoder.layers
    ]


def cache_bound(cfg: dict, memory_per_layer, vocabulary_size: int) -> float:
    """Multiply-adds per block without the cache over those with it: the most the cache can speed evaluation up
    if every operation ran at the same efficiency. Per layer, with N memories and T = N + M keys: projections and
    feed-forward of the block, attention to T keys and the position band; without the cache, also the keys and
    values of the N memories."""
    B, M, H, F = cfg["batch"], cfg["block"], cfg["width"], cfg["ffn"]
    cached = uncached = B * M * H * vocabulary_size  # output layer
    for N in memory_per_layer:
        block = B * M * (4 * H * H + 2 * H * F + 2 * (N + M) * H + M * H)
        cached += block
        uncached += block + 2 * B * N * H * H
    return uncached / cached


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM)


def peak_memory_mb(device) -> float:
    """CUDA max allocated, or the peak RSS since the last reset (Linux) or since the start."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if os.path.exists("/proc/self/status"):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args) -> dict:
    """One configuration, in this process."""
    import torch
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    import fairseq_expire  # noqa: F401  (registers the models)

    if args.memory_limit_gb:
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cfg = CONFIGS[args.config]
    device = torch.device(args.device)
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
        **memory_options(args.model, cfg, args.max_span),
    )
    model_class = ARCH_MODEL_REGISTRY[args.model]
    config = getattr(model_class, "__dataclass")(**options)
    model = model_class.build_model(config, SimpleNamespace(target_dictionary=dictionary)).to(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    B, M = cfg["batch"], cfg["block"]
    stream = torch.randint(4, len(dictionary), (B, (args.warmup + args.batches + 1) * M), device=device)
    if args.mode == "eval":
        model.eval()
        model.decoder.cache_projections_in_eval = args.eval_cache
    else:
        model.train()
    prefill(model.decoder, B, cfg["init"], model.decoder.embed_tokens.weight)
    # Evaluation with the cache is also timed against a twin without it, block by block in this process, so
    # that the speed-up is not a comparison of two moments of a shared machine.
    twin = None
    if args.mode == "eval" and args.eval_cache:
        twin = copy.deepcopy(model)
        twin.decoder.cache_projections_in_eval = False
    twin_times = []

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, spans, kept = [], [], []
    for k in range(args.warmup + args.batches):
        if k == args.warmup:
            reset_peak_memory(device)
        tokens = stream[:, k * M : (k + 1) * M]
        target = stream[:, k * M + 1 : (k + 1) * M + 1]
        synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if args.mode == "eval":
                with torch.no_grad():
                    logits, extra = model(tokens)
            else:
                logits, extra = model(tokens)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
                (loss + 1e-6 * (extra["aux_loss"] + extra.get("adaptive_span_loss", 0))).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
            spans.append(float(extra["span_avg"]))
            kept.append([float(x) for x in extra["mem_sizes"]])
        if twin is not None:
            start = time.perf_counter()
            with torch.no_grad():
                twin(tokens)
            synchronize()
            if k >= args.warmup:
                twin_times.append(time.perf_counter() - start)
    peak_mb = peak_memory_mb(device)
    batch_time = statistics.median(times)
    memory_per_layer = [round(statistics.mean(layer), 1) for layer in zip(*kept)]
    return {
        **identity(args),
        "device": str(device),
        "tokens_per_s": B * M / batch_time,
        "batch_time_ms": 1000 * batch_time,
        "peak_memory_mb": peak_mb,
        "span_avg": statistics.mean(spans),
        "memory_per_layer": memory_per_layer,
        **(
            {
                "cache_speedup": statistics.median(twin_times) / batch_time,
                "cache_bound": cache_bound(cfg, memory_per_layer, len(dictionary)),
            }
            if twin_times
            else {}
        ),
    }


def memory_options(model: str, cfg: dict, max_span: int) -> dict:
    """How each model is given the maximum span L (expire-span and Adaptive-Span start at p * L)."""
    if model == "compressive_lm":
        return dict(mem_size=cfg["block"], cmem_size=(max_span - cfg["block"]) // 4, compression_rate=4)
    if model == "adaptive_span_lm":
        return dict(max_span=max_span, adaptive_span_ramp=cfg["ramp"], adaptive_span_init=cfg["init"])
    if model == "expire_span_lm":
        return dict(max_span=max_span, expire_span_ramp=cfg["ramp"], expire_span_init_percentage=cfg["init"])
    return dict(max_span=max_span)


def identity(args) -> dict:
    return {
        "config": args.config,
        "model": args.model,
        "mode": args.mode + ("" if args.mode == "train" else ("+cache" if args.eval_cache else "")),
        "max_span": args.max_span,
        "dtype": args.dtype,
    }


def run_in_subprocess(args, **overrides) -> dict:
    command = [sys.executable, __file__, "--measure"]
    for key, value in {**vars(args), **overrides}.items():
        if key in ("measure", "json", "lengths", "models", "modes", "no_follow"):
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            command += [f"--{key.replace('_', '-')}"] if value else []
        else:
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows) -> str:
    lines = [
        "| model | mode | L | tokens/s | vs authors | ms/batch | peak MB | span avg | memory/layer "
        "| cache speed-up (bound) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['mode']} | {r['max_span']} |"
        if r.get("out_of_memory"):
            lines.append(f"{head} out of memory ({r['memory_limit_gb']} GB limit) | | | | | | |")
            continue
        memory = sum(r["memory_per_layer"]) / len(r["memory_per_layer"])
        authors = (
            AUTHORS_TRAIN_TOKENS_PER_S.get((r["model"], r["max_span"])) if r["mode"] == "train" else None
        )
        versus = f"{r['tokens_per_s'] / authors:.2f}x" if authors and r["config"] == "cpu_small" else ""
        speedup = f"{r['cache_speedup']:.2f}x ({r['cache_bound']:.2f}x)" if "cache_speedup" in r else ""
        lines.append(
            f"{head} {r['tokens_per_s']:.0f} | {versus} | {r['batch_time_ms']:.0f} "
            f"| {r['peak_memory_mb']:.0f} | {r['span_avg']:.0f} | {memory:.0f} | {speedup} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu_small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="max spans L")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["expire_span_lm", "fixed_span_lm", "adaptive_span_lm", "compressive_lm"],
        choices=["expire_span_lm", "fixed_span_lm", "adaptive_span_lm", "compressive_lm"],
    )
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--batches", type=int, default=8, help="timed batches (median reported)")
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
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", type=Path, help="write all figures here")
    # internal: one measurement
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="expire_span_lm", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--max-span", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--eval-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        try:
            row = measure(args)
        except (MemoryError, RuntimeError) as error:  # torch's CPU and CUDA allocators raise RuntimeError
            if "memory" not in str(error).lower():
                raise
            row = {**identity(args), "out_of_memory": True, "memory_limit_gb": args.memory_limit_gb}
        print(json.dumps(row))
        return

    rows = []

    def measured(**settings):
        row = run_in_subprocess(args, **settings)
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
        return row

    for length in args.lengths:
        for model in args.models:
            for mode in args.modes:
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
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
