"""`make demo` end to end, shortened: prepare the licence corpus, train both models, score, table and figures."""

import re

import pytest
from console import run

pytestmark = pytest.mark.slow


def test_demo_trains_both_models_and_reports_a_table_and_figures(tmp_path):
    result = run("python", "scripts/demo.py", "--work", tmp_path, "--updates", 20)
    output = result.stdout
    progress = [line for line in output.splitlines() if re.match(r"\s+(expire|fixed)_span_lm\s+update", line)]
    assert len(progress) == 20  # ten progress lines per model, no flood
    span = int(re.search(r"training fixed_span_lm the same way, span (\d+)", output).group(1))
    rows = re.findall(
        r"^\| (\w+) \(.*?\) \| ([\d.]+) \| ([\d.]+) \(.*?\) \| ([\d.]+) \| (\d+) s \|$", output, re.M
    )
    assert [row[0] for row in rows] == ["expire_span_lm", "fixed_span_lm"]
    for _, bits, memory, keys, _ in rows:
        assert 0 < float(bits) < 8.1 and float(memory) > 0 and float(keys) > 0  # 20 updates: about uniform
    assert abs(float(rows[1][2]) - span) <= 2  # the baseline keeps the memory Expire-Span kept
    paragraphs = output.split("\n\n")
    assert "bits/byte" in paragraphs[-4]  # the lines saying what the table means
    assert paragraphs[-3].startswith('A generation from expire_span_lm (200 bytes after "The Licensee"')
    assert paragraphs[-2].startswith("    The Licensee") and len(paragraphs[-2]) > len("    The Licensee")
    figures = tmp_path / "figures"
    for name in ("spans.png", "spans.html", "memory_curve.png", "memory_curve.csv"):
        assert (figures / name).stat().st_size > 0 and str(figures / name) in output
    assert (tmp_path / "report.md").read_text().startswith("| model |")
    commands = (tmp_path / "commands.sh").read_text()
    assert commands.count("fairseq-train ") == 2 and "scripts/visualize_spans.py" in commands
    assert "scripts/generate.py" in commands
