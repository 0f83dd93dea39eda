#!/usr/bin/env python3
"""Generate text with the expiring memory, streamed as it is made; tokens/s and memory kept per layer at the end.

    python scripts/generate.py --checkpoint demo/checkpoints/checkpoint_best.pt --prompt "The licensee" \\
        --max-tokens 2000 --sampling-topp 0.9 --temperature 0.8 --seed 1
    python scripts/generate.py --checkpoint CKPT --prompt-file start.txt --max-tokens 100000 > long.txt

The prompt is read in blocks (--tokens-per-sample of the checkpoint), then tokens are sampled one at a time; each
memory is deleted as soon as no later token can see it, so memory stays at most L + R entries per layer. Bytes,
characters and sentencepiece pieces are decoded back to text as the data preparation encoded them (prepare.json).
"""

from fairseq_expire.generate import cli_main

if __name__ == "__main__":
    cli_main()
