#!/usr/bin/env python3
"""Bits per token against memory: one checkpoint with its spans capped at several values (paper Figures 7, 10).

    python scripts/memory_curve.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt \\
        --split test --caps 16 64 256 1024 --compare 64 none --out demo/memory_curve

Each cap is the evaluation option inference_max_span (fairseq-eval-lm --model-overrides
"{'inference_max_span': N}"); no cap is always evaluated too. Each run scores the whole split from an empty
memory as fairseq-eval-lm --batch-size STREAMS does. Writes OUT/memory_curve.csv and .json (bits per token, memory
kept per layer, mean span, per cap) and OUT/memory_curve.png (bits per token against the memory kept). With
--compare A B it also lists the tokens whose loss drops most from cap A to cap B, with the text before them:
what needs the long memory.
"""

from fairseq_expire.analysis.cli import memory_curve_main
from fairseq_expire.errors import exit_on_usage_error

if __name__ == "__main__":
    exit_on_usage_error("memory_curve.py", lambda: memory_curve_main(__doc__))
