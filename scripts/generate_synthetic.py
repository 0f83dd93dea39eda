#!/usr/bin/env python3
"""Generate the Expire-Span paper's synthetic tasks as fairseq data-bin directories with label streams.

    python scripts/generate_synthetic.py corridor --out data-bin/corridor --max-length 20
    python scripts/generate_synthetic.py all --out data-bin --train-tokens 10000000

Each task's options: ``python scripts/generate_synthetic.py TASK --help``.
"""

from fairseq_expire.synthetic.cli import main

if __name__ == "__main__":
    main()
