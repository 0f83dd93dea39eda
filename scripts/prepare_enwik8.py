#!/usr/bin/env python3
"""Prepare enwik8 (byte level, 90M/5M/5M) as a fairseq data directory for --task language_modeling_with_memory.

python scripts/prepare_enwik8.py --out data-bin/enwik8                    # downloads enwik8.zip
python scripts/prepare_enwik8.py --zip ~/enwik8.zip --newlines eos --out data-bin/enwik8-eos
"""

from fairseq_expire.prepare import enwik8
from fairseq_expire.prepare.cli import main

if __name__ == "__main__":
    main(enwik8.prepare_enwik8, enwik8.Enwik8Config, __doc__ + "\n" + enwik8.__doc__)
