#!/usr/bin/env python3
"""What each layer keeps: the expire-span of every token, as an HTML page and a PNG heatmap (paper Figs. 9, 12).

    python scripts/visualize_spans.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt \\
        --text-file /usr/share/common-licenses/GPL-3 --length 600 --out spans
    python scripts/visualize_spans.py --checkpoint CKPT --split test --offset 5000 --length 400 --out spans
    python scripts/visualize_spans.py --checkpoint CKPT --text "..." --edit Licensee=Customer --out edit

The text is fed block by block (--tokens-per-sample of the checkpoint) with the memory carried, from an empty
memory, as fairseq-eval-lm does. Writes OUT.html (one row per layer, hover a token for its span, then the text)
and OUT.png (layers x tokens; --width pixels wide, 72 + 32 per layer pixels high per panel). With --edit OLD=NEW
the first whole-word OLD is replaced by NEW, both texts are run, and a third panel shows how each later token's
span changed (red: kept longer after the edit, blue: shorter; grey: tokens the edit added).
"""

from fairseq_expire.analysis.cli import visualize_spans_main
from fairseq_expire.errors import exit_on_usage_error

if __name__ == "__main__":
    exit_on_usage_error("visualize_spans.py", lambda: visualize_spans_main(__doc__))
