#!/usr/bin/env python3
"""Prepare PG-19 at the character level as a fairseq data directory for --task language_modeling_with_memory.

python scripts/prepare_pg19.py --out data-bin/pg19                          # downloads ~11 GB of books
python scripts/prepare_pg19.py --max-books 100 --out data-bin/pg19-100      # a small subset
python scripts/prepare_pg19.py --source /data/deepmind-gutenberg --out data-bin/pg19
"""

from fairseq_expire.prepare import pg19
from fairseq_expire.prepare.cli import main

if __name__ == "__main__":
    main(pg19.prepare_pg19, pg19.Pg19Config, __doc__ + "\n" + pg19.__doc__)
