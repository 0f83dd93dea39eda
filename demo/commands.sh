#!/bin/sh
# the commands of the last `make demo` run, in order
set -e
# prepare the corpus
.venv/bin/python scripts/prepare_text.py --input /usr/share/common-licenses/Apache-2.0 /usr/share/common-licenses/Artistic /usr/share/common-licenses/BSD /usr/share/common-licenses/CC0-1.0 /usr/share/common-licenses/GFDL-1.2 /usr/share/common-licenses/GFDL-1.3 /usr/share/common-licenses/GPL-1 /usr/share/common-licenses/GPL-2 /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/LGPL-2 /usr/share/common-licenses/LGPL-2.1 /usr/share/common-licenses/LGPL-3 /usr/share/common-licenses/MPL-1.1 /usr/share/common-licenses/MPL-2.0 --tokenizer bytes --newlines eos --out demo/data-bin
# train expire_span_lm
.venv/bin/fairseq-train demo/data-bin --user-dir .venv/lib/python3.11/site-packages/fairseq_expire --task language_modeling_with_memory --criterion expire_span_cross_entropy --decoder-layers 3 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4 --tokens-per-sample 64 --batch-size 8 --optimizer adam --lr 0.002 --clip-norm 0.3 --lr-scheduler inverse_sqrt --warmup-updates 100 --no-epoch-checkpoints --cpu --num-workers 0 --seed 1 --log-format json --no-progress-bar --arch expire_span_lm_tiny --max-span 2048 --expire-span-ramp 32 --expire-span-alpha 1e-06 --max-update 1500 --log-interval 150 --save-dir demo/checkpoints/expire_span_lm
# train fixed_span_lm
.venv/bin/fairseq-train demo/data-bin --user-dir .venv/lib/python3.11/site-packages/fairseq_expire --task language_modeling_with_memory --criterion expire_span_cross_entropy --decoder-layers 3 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4 --tokens-per-sample 64 --batch-size 8 --optimizer adam --lr 0.002 --clip-norm 0.3 --lr-scheduler inverse_sqrt --warmup-updates 100 --no-epoch-checkpoints --cpu --num-workers 0 --seed 1 --log-format json --no-progress-bar --arch fixed_span_lm_tiny --max-span 123 --max-update 1500 --log-interval 150 --save-dir demo/checkpoints/fixed_span_lm
# score the test split (and draw the bits-vs-memory curve)
.venv/bin/python scripts/memory_curve.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt --split test --caps 16 32 64 128 256 --out demo/figures --cpu
# score the test split (and draw the bits-vs-memory curve)
.venv/bin/python scripts/memory_curve.py --checkpoint demo/checkpoints/fixed_span_lm/checkpoint_best.pt --split test --caps none --out demo/logs/fixed_span_lm --cpu
# the span map of a test passage
.venv/bin/python scripts/visualize_spans.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt --split test --offset 2000 --length 110 --out demo/figures/spans --cpu
# a generation from the Expire-Span model
.venv/bin/python scripts/generate.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt --prompt 'The Licensee' --max-tokens 200 --sampling-topp 0.9 --temperature 0.8 --seed 1 --cpu
