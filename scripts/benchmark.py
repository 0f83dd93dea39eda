#!/usr/bin/env python3
"""Speed and memory of the four memory models side by side in one run; see ``fairseq_expire/benchmark.py``
(``python scripts/benchmark.py --help``)."""

from fairseq_expire.benchmark import main

if __name__ == "__main__":
    main()
