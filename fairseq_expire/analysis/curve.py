"""Loss against memory: one checkpoint evaluated with its spans capped at several values (paper Figures 7, 10).

At evaluation, ``inference_max_span`` c caps every span at c and deletes memories accordingly, so the model keeps
less. Bits per token against the memory actually kept per layer shows what memory buys; the per-token loss
difference between two caps shows which tokens need the long memory.
"""

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .runner import AnalysisError, BlockRun, LoadedModel, Vocabulary, load_model, run_blocks
from .spans import new_figure

logger = logging.getLogger(__name__)

UNCAPPED = ("none", "uncapped", "inf")
UNIT_NAMES = {"bytes": "byte", "characters": "character"}


def parse_cap(text: str) -> Optional[int]:
    """A cap from the command line: a positive number of steps, or "none" for no cap."""
    if text.lower() in UNCAPPED:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"a cap is a positive number of steps or 'none', not {text!r}")
    return int(text)


def cap_label(cap: Optional[int]) -> str:
    return "none" if cap is None else str(cap)


def ordered_caps(caps) -> List[Optional[int]]:
    """Distinct caps, smallest first, no cap last (it is always evaluated)."""
    return sorted(set(caps) | {None}, key=lambda cap: math.inf if cap is None else cap)


@dataclass
class CapResult:
    cap: Optional[int]
    run: BlockRun

    def record(self) -> dict:
        return {
            "cap": cap_label(self.cap),
            "bits_per_token": round(self.run.bits_per_token(), 5),
            "mem_avg": round(float(self.run.mem_per_layer.mean()), 2),
            "mem_per_layer": [round(float(kept), 2) for kept in self.run.mem_per_layer],
            "span_avg": round(float(self.run.spans.mean()), 2),
            "attn_mem_avg": round(self.run.attn_mem_avg, 2),
        }


def evaluate_caps(
    checkpoint, caps, split: str, data=None, streams: int = 1, cpu: bool = False
) -> Tuple[LoadedModel, List[CapResult]]:
    """Every cap of :func:`ordered_caps`, each on the whole split from a cold memory; the model (for its
    dictionary and sizes) and one result per cap."""
    loaded = load_model(checkpoint, data, cpu=cpu)
    tokens, results = loaded.split_tokens(split), []
    for cap in ordered_caps(caps):
        loaded.cap_spans(cap)
        result = CapResult(cap, run_blocks(loaded, tokens, streams))
        logger.info(f"cap {cap_label(cap)}: {result.record()}")
        results.append(result)
    return loaded, results


def per_token_name(vocabulary: Vocabulary) -> str:
    return UNIT_NAMES.get(vocabulary.unit, "token")


def write_tables(results: List[CapResult], directory: Path, info: dict) -> Tuple[Path, Path]:
    """``memory_curve.csv`` (a row per cap, a column per layer) and ``memory_curve.json`` (with ``info``)."""
    directory.mkdir(parents=True, exist_ok=True)
    records = [result.record() for result in results]
    layers = len(records[0]["mem_per_layer"])
    csv_path, json_path = directory / "memory_curve.csv", directory / "memory_curve.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["cap", "bits_per_token", "mem_avg", *(f"mem_l{i}" for i in range(layers)), "span_avg"]
        )
        for record in records:
            writer.writerow(
                [
                    record["cap"],
                    record["bits_per_token"],
                    record["mem_avg"],
                    *record["mem_per_layer"],
                    record["span_avg"],
                ]
            )
    json_path.write_text(json.dumps({**info, "caps": records}, indent=2, ensure_ascii=False) + "\n")
    return csv_path, json_path


def plot_curve(
    results: List[CapResult], path: Path, title: str, unit: str, width: int = 768, height: int = 512
):
    """Bits per token against the memory kept (mean over layers, log scale), a point per cap."""
    figure = new_figure(width, height)
    from matplotlib.ticker import FuncFormatter

    axes = figure.add_axes([0.12, 0.14, 0.83, 0.76])
    memory = [float(result.run.mem_per_layer.mean()) for result in results]
    bits = [result.run.bits_per_token() for result in results]
    axes.plot(memory, bits, marker="o", color="#a50f15")
    caps_at = {}  # caps that keep about the same memory for about the same loss share one label
    for result, point in zip(results, zip(memory, bits)):
        key = (round(point[0]), round(point[1], 2))
        caps_at.setdefault(key, (point, []))[1].append(cap_label(result.cap))
    rightmost = max(memory)
    for (x, y), labels in caps_at.values():
        left = x == rightmost  # its label goes left of it, inside the axes
        axes.annotate(
            f"cap {', '.join(labels)}",
            (x, y),
            textcoords="offset points",
            xytext=(-6 if left else 6, 6),
            ha="right" if left else "left",
            fontsize=12,
        )
    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.tick_params(which="both", labelsize=11)
    axes.set_xlabel("memories kept per layer (mean)", fontsize=13)
    axes.set_ylabel(f"bits per {unit}", fontsize=13)
    axes.set_title(title, fontsize=13, loc="left")
    axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path)


def long_memory_tokens(
    short: CapResult, long: CapResult, vocabulary: Vocabulary, top: int = 20, context: int = 40
) -> dict:
    """The tokens whose loss drops most from cap ``short`` to cap ``long``, with the ``context`` tokens before."""
    if short.run.tokens.shape != long.run.tokens.shape:
        raise AnalysisError("--compare needs two runs over the same tokens")
    gain = (short.run.nll - long.run.nll) / math.log(2)  # N, bits; NaN where no token was predicted
    scored = ~gain.isnan()
    order = torch.argsort(gain.masked_fill(~scored, -math.inf), descending=True)[
        : min(top, int(scored.sum()))
    ]
    tokens = short.run.tokens
    listing = []
    for position in order.tolist():
        strings = vocabulary.token_strings(tokens[max(0, position - context) : position + 1])
        listing.append(
            {
                "position": position,
                "token": strings[-1],
                "context": "".join(strings[:-1]),
                f"bits_cap_{cap_label(short.cap)}": round(float(short.run.nll[position]) / math.log(2), 4),
                f"bits_cap_{cap_label(long.cap)}": round(float(long.run.nll[position]) / math.log(2), 4),
                "gain_bits": round(float(gain[position]), 4),
            }
        )
    return {
        "short_cap": cap_label(short.cap),
        "long_cap": cap_label(long.cap),
        "mean_gain_bits": round(float(gain[scored].mean()), 5),
        "tokens_better_with_long": round(float((gain[scored] > 0).float().mean()), 4),
        "top_tokens": listing,
    }
