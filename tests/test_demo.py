"""`make demo` end to end, shortened: prepare the licence corpus, fairseq-train, fairseq-eval-lm, figures."""

import re

import pytest
from console import run

pytestmark = pytest.mark.slow


def test_demo_prepares_trains_evaluates_and_reports(tmp_path):
    result = run("python", "scripts/demo.py", "--work", tmp_path, "--updates", 30)
    output = result.stdout
    bits = float(re.search(r"test \(fairseq-eval-lm.*\): ([\d.]+) bits/byte", output).group(1))
    assert 0 < bits < 8  # 30 updates on bytes: better than uniform over 256 values
    assert re.search(r"mean span [\d.]+ of L = 2048", output)
    assert (tmp_path / "checkpoints" / "checkpoint_best.pt").exists()
