#!/usr/bin/env python3
"""`make demo`: Expire-Span and its fixed-span baseline trained and compared on CPU in a few minutes; see
``fairseq_expire/demo.py`` (``python scripts/demo.py --help``)."""

from fairseq_expire.demo import main
from fairseq_expire.errors import exit_on_usage_error

if __name__ == "__main__":
    exit_on_usage_error("make demo", main)
