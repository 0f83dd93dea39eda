"""adaptive_span_lm and compressive_lm through the real fairseq-train and fairseq-eval-lm: the same task,
criterion and memory figures as expire_span_lm, bounded memory, every token scored once."""

import json
import math
import re
from pathlib import Path

import pytest
from console import REPO, eval_lm_bits, json_logs, random_letters_data_bin, run, train_command
from test_task_cli import BLOCK, direct_loss, eval_lm_blocks, split_tokens

from fairseq_expire.launch.fairseq_args import (
    grid_point_args,
    parse_train_args,
    with_json_logs,
    with_user_dir,
)
from fairseq_expire.launch.sweep import expand, load_grid

pytestmark = pytest.mark.slow

LICENSES = Path("/usr/share/common-licenses")

# arch -> (extra options, bound on the entries a layer keeps)
BASELINES = {
    "adaptive_span_lm_tiny": (("--adaptive-span-loss", 0.01, "--adaptive-span-init", 0.5), 64 + 8),  # L + R
    "compressive_lm_tiny": ((), 16 + 8),  # n_mem + n_cmem
}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return random_letters_data_bin(tmp_path_factory.mktemp("baselines"))


@pytest.mark.parametrize("arch", sorted(BASELINES))
def test_trains_logs_the_memory_figures_and_eval_lm_scores_every_token_once(data_bin, tmp_path, arch):
    extra, bound = BASELINES[arch]
    result = run(
        "fairseq-train",
        *train_command(data_bin, tmp_path, *extra, arch=arch, updates=10, block=BLOCK, batch=4),
        "--best-checkpoint-metric",
        "nll_loss",
    )
    output = result.stdout + result.stderr
    fields = {"loss", "nll_loss", "span_avg", "span_max", "mem_avg", "mem_l0", "mem_l1", "attn_mem_avg"}
    for tag in ("train_inner", "train", "valid"):
        record = {
            key.replace(f"{tag}_", "").replace("train_", ""): value
            for key, value in json_logs(output, tag)[-1].items()
        }
        assert fields <= record.keys(), tag
        assert 0 < float(record["mem_l0"]) <= bound and 0 < float(record["mem_l1"]) <= bound
        if arch.startswith("adaptive"):
            heads = [float(record[f"span_l{i}_h{k}"]) for i in range(2) for k in range(2)]
            assert all(0 <= z <= 64 for z in heads)
            if tag != "valid":  # coefficient x the L1 of z (mean over heads, summed over layers), in bits
                expected = 0.01 * sum(heads) / 2 / math.log(2)
                assert float(record["adaptive_span_loss"]) == pytest.approx(expected, rel=0.05, abs=2e-4)

    streams = 3
    checkpoint = tmp_path / "checkpoint_last.pt"
    evaluation = eval_lm_blocks(data_bin, checkpoint, "--batch-size", streams)
    output = evaluation.stdout + evaluation.stderr
    evaluated = int(re.search(r"Evaluated ([\d,]+) tokens", output).group(1).replace(",", ""))
    loss = eval_lm_bits(output)
    assert evaluated == len(split_tokens(data_bin, "valid")) - streams
    expected_loss, count = direct_loss(checkpoint, data_bin, streams)
    assert count == evaluated
    assert loss == pytest.approx(expected_loss, abs=2e-4)


def test_the_comparison_grid_is_one_command_line_every_model_accepts(tmp_path):
    spec = load_grid([str(REPO / "sweeps" / "enwik8_baselines.yaml")])
    points = expand(spec.grid)
    assert sorted(point["arch"].split("_lm")[0] for point in points) == sorted(
        ["expire_span", "fixed_span", "adaptive_span", "compressive"]
    )
    fixed = [
        str(tmp_path) if arg == "data-bin/enwik8" else arg for arg in spec.fairseq_args
    ]  # not prepared here
    args = with_user_dir(with_json_logs(fixed))
    for point in points:
        parse_train_args(args + grid_point_args(point), point["arch"], list(spec.grid))


def test_the_figure_7_analog_script_trains_and_scores_each_model(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("GPL-3", "Apache-2.0"):
        (corpus / name).write_bytes((LICENSES / name).read_bytes())
    out = tmp_path / "rows.json"
    # fmt: off
    run("python", "scripts/compare_memory.py", "--corpus", corpus, "--work", tmp_path / "work", "--sizes", 68,
        "--models", "adaptive_span_lm", "compressive_lm", "--updates", 2, "--json", out)
    # fmt: on
    rows = json.loads(out.read_text())
    assert [(row["model"], row["L"]) for row in rows] == [("adaptive_span_lm", 68), ("compressive_lm", 68)]
    for row in rows:
        assert 0 < row["test_bits_per_byte"] < 9 and row["mem_avg"] > 0
