"""What a trained model remembers (paper section 6): per-token expire-spans and losses, block by block.

- :mod:`.runner`: load a checkpoint with its dictionary, turn text into tokens and back, feed a token sequence
  block by block with the memory carried (as ``fairseq-eval-lm`` does) and collect spans and losses per token;
- :mod:`.spans`: spans as a colour-coded HTML page and a PNG heatmap, and "edit the past" (Figures 9 and 12);
- :mod:`.curve`: loss against the memory kept under inference caps on the span (Figures 7 and 10).

``scripts/visualize_spans.py`` and ``scripts/memory_curve.py`` are thin command lines over these.
"""
