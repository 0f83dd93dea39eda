"""Synthetic tasks of the Expire-Span paper (copy, collision, corridor, portal, instruction) as fairseq data.

Each task writes a data-bin directory (dict.txt, {split}.bin/.idx and the label stream {split}.labels.bin/.idx)
for ``fairseq-train --task language_modeling_with_memory``, which reports acc/err on the scored labels. Generate
with ``python scripts/generate_synthetic.py TASK --out data-bin/NAME`` (see ``--help``).
"""

from . import collision, copy, corridor, instruction, portal  # noqa: F401  (registration)
from .common import GENERATORS, SyntheticDataError, generate_dataset  # noqa: F401
