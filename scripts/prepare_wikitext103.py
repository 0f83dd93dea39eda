#!/usr/bin/env python3
"""Prepare Wikitext-103 (word level) with fairseq-preprocess, for --task language_modeling_with_memory.

python scripts/prepare_wikitext103.py --out data-bin/wikitext-103
python scripts/prepare_wikitext103.py --zip ~/wikitext-103-v1.zip --out data-bin/wikitext-103
"""

from fairseq_expire.prepare import wikitext103
from fairseq_expire.prepare.cli import main

if __name__ == "__main__":
    main(wikitext103.prepare_wikitext103, wikitext103.Wikitext103Config, __doc__ + "\n" + wikitext103.__doc__)
