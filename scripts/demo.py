#!/usr/bin/env python3
"""`make demo`: Expire-Span and its fixed-span baseline trained and compared on CPU in a few minutes; see
``fairseq_expire/demo.py`` (``python scripts/demo.py --help``)."""

import sys

from fairseq_expire.demo import main
from fairseq_expire.errors import UsageError

if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
