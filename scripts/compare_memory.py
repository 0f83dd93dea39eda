#!/usr/bin/env python3
"""The paper's Figure 7 analog on the demo corpus: bits per byte against memory kept for the four memory schemes;
see ``fairseq_expire/compare_memory.py`` (``python scripts/compare_memory.py --help``)."""

from fairseq_expire.compare_memory import main
from fairseq_expire.errors import exit_on_usage_error

if __name__ == "__main__":
    exit_on_usage_error("compare_memory.py", main)
