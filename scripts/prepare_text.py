#!/usr/bin/env python3
"""Prepare your own text as a fairseq data directory for --task language_modeling_with_memory.

    python scripts/prepare_text.py --input book1.txt book2.txt --tokenizer chars --out data-bin/books
    python scripts/prepare_text.py --train a.txt --valid b.txt --test c.txt --tokenizer spm \\
        --spm-vocab-size 16000 --out data-bin/mytext
"""

from fairseq_expire.prepare import text
from fairseq_expire.prepare.cli import main

if __name__ == "__main__":
    main(text.prepare_text, text.TextConfig, __doc__ + "\n" + text.__doc__)
