"""scripts/visualize_spans.py, scripts/memory_curve.py and the block-by-block runner behind them.

The end-to-end tests share one tiny model trained on text where each 12-letter unit is said 4 times: with blocks
of 16, predicting a repeat needs the tokens 12 back, often in the previous block, so capping the spans hurts.
"""

import json
import re
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from console import eval_lm, eval_lm_bits, repeating_text, run, train_command

from fairseq_expire.analysis.runner import (
    AnalysisError,
    BlockRun,
    Vocabulary,
    load_model,
    run_blocks,
    vocabulary_of,
)
from fairseq_expire.analysis.spans import (
    AXIS_PX,
    ROW_PX,
    TITLE_PX,
    aligned_baseline,
    apply_edit,
    new_figure,
)
from fairseq_expire.prepare.vocab import CODE_POINTS, ByteVocabulary, CharVocabulary, count_characters

PERIOD, LAYERS, BLOCK = 12, 2, 16
slow = pytest.mark.slow


# --- no model needed ------------------------------------------------------------------------------------------------


def test_bytes_encode_like_the_data_preparation_and_decode_back():
    prepared = ByteVocabulary("eos")
    vocabulary = Vocabulary(prepared.dictionary, "bytes", "eos")
    text = "Licence, café\nend"
    ids = vocabulary.encode(text)
    assert ids.tolist() == prepared.encode(text.encode("utf-8")).tolist()
    strings = vocabulary.token_strings(ids)
    assert len(strings) == len(text.encode("utf-8"))
    assert strings[12:14] == ["", "é"]  # two bytes, the character shown at the last
    assert "".join(strings) == text


def char_dictionary(text: str):
    codes, counts = count_characters(text, "eos")
    full_counts = np.zeros(CODE_POINTS, dtype=np.int64)
    full_counts[codes] = counts
    return CharVocabulary(full_counts, "eos").dictionary


def test_characters_outside_the_dictionary_are_refused_by_name():
    vocabulary = Vocabulary(char_dictionary("abc ab\n"), "characters", "eos")
    assert vocabulary.text(vocabulary.encode("ba c\n")) == "ba c\n"
    with pytest.raises(AnalysisError, match=r"2 characters .* not in the model's dictionary .*U\+0078 x: 2"):
        vocabulary.encode("xax")


def test_unit_is_guessed_from_the_symbols_without_a_preparation_record(tmp_path):
    for unit, dictionary in (
        ("bytes", ByteVocabulary("eos").dictionary),
        ("characters", char_dictionary("ab \t")),
    ):
        assert vocabulary_of(tmp_path, dictionary).unit == unit


def test_edit_replaces_the_first_whole_word_only():
    assert apply_edit("the cat sat on the mat; theory", "the=a") == ("a cat sat on the mat; theory", 0)
    assert apply_edit("concat cat cat", "cat=dog") == ("concat dog cat", 7)
    with pytest.raises(AnalysisError, match="does not occur"):
        apply_edit("concatenate", "cat=dog")
    with pytest.raises(AnalysisError, match="OLD=NEW"):
        apply_edit("cat", "cat")


def test_edited_tokens_are_aligned_to_the_original_ones():
    def block_run(tokens):
        tokens = torch.tensor(tokens)
        return BlockRun(tokens, tokens.float().expand(2, -1), torch.zeros(len(tokens)), torch.zeros(2))

    baseline = aligned_baseline(block_run([5, 6, 7, 8, 9]), block_run([5, 6, 70, 71, 8, 9]))
    assert baseline[0, [0, 1, 4, 5]].tolist() == [5, 6, 8, 9]
    assert baseline[:, 2:4].isnan().all()


def test_missing_checkpoint_and_missing_matplotlib_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(AnalysisError, match="checkpoint .*nothing.pt not found"):
        load_model(tmp_path / "nothing.pt")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(AnalysisError, match=re.escape("pip install fairseq-expire[viz]")):
        new_figure(100, 100)


# --- end to end: a trained model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, data directory, valid text) of a 2-layer model trained 200 updates (about 10 s)."""
    directory = tmp_path_factory.mktemp("analysis")
    texts = {
        split: repeating_text(n, PERIOD, seed=s) for split, n, s in (("train", 30000, 1), ("valid", 3000, 2))
    }
    for split, text in texts.items():
        (directory / f"{split}.txt").write_text(text)
    data = directory / "bin"
    run(
        "python", "scripts/prepare_text.py", "--train", directory / "train.txt", "--valid", directory / "valid.txt",
        "--test", directory / "valid.txt", "--tokenizer", "chars", "--out", data,
    )  # fmt: skip
    command = train_command(
        data, directory / "ckpt", "--disable-validation", updates=200, block=BLOCK, batch=16
    )
    run("fairseq-train", *command, "--max-span", 64, "--expire-span-init-percentage", 0.5)
    return directory / "ckpt" / "checkpoint_last.pt", data, texts["valid"]


@slow
@pytest.mark.parametrize("cap, streams", [(None, 2), (8, 1)])
def test_block_runner_losses_are_fairseq_eval_lm_loss(trained, cap, streams):
    checkpoint, data, _ = trained
    overrides = ("--model-overrides", f"{{'inference_max_span': {cap}}}") if cap else ()
    result = eval_lm(data, checkpoint, "--tokens-per-sample", BLOCK, "--batch-size", streams, *overrides)
    reported = eval_lm_bits(result.stdout + result.stderr)
    loaded = load_model(checkpoint, inference_max_span=cap, cpu=True)
    block_run = run_blocks(loaded, loaded.split_tokens("valid"), streams)
    assert int(block_run.scored.sum()) == 3000 - streams  # every token but each stream's first
    assert block_run.bits_per_token() == pytest.approx(reported, abs=1e-4)  # eval-lm prints 4 decimals


@slow
def test_an_edit_changes_no_span_before_it(trained):
    checkpoint, _, valid = trained
    loaded = load_model(checkpoint, cpu=True)
    word = "\n".join(valid[i : i + PERIOD] for i in range(0, 8 * PERIOD, PERIOD))  # units 0, 0, 0, 0, 1, ...
    edited_text, position = apply_edit(word, f"{valid[4 * PERIOD : 5 * PERIOD]}=ponmlkjihgfe")
    assert position == 4 * (PERIOD + 1)
    original = run_blocks(loaded, loaded.vocabulary.encode(word))
    edited = run_blocks(loaded, loaded.vocabulary.encode(edited_text))
    change = edited.spans - aligned_baseline(original, edited)
    assert (change[:, :position] == 0).all()  # causal: the past of the edit is computed identically
    assert change[:, position:].abs().nan_to_num(1.0).sum() > 0


class SpanRows(HTMLParser):
    """The token elements (their hover titles) of each layer row of a visualize_spans page, per panel."""

    def __init__(self):
        super().__init__()
        self.panels, self.depth_in_row = [], None
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.panels.append([])
        if tag == "div":
            self.depth += 1
            if attrs.get("class") == "layer":
                self.panels[-1].append([])
                self.depth_in_row = self.depth
        if tag == "span" and attrs.get("class") == "t" and self.depth_in_row is not None:
            self.panels[-1][-1].append(attrs["title"])

    def handle_endtag(self, tag):
        if tag == "div":
            if self.depth == self.depth_in_row:
                self.depth_in_row = None
            self.depth -= 1


def page_rows(path):
    parser = SpanRows()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.panels


def png_shape(path):
    from matplotlib.image import imread

    return imread(path).shape[:2]


@slow
def test_visualize_spans_writes_a_row_per_layer_and_a_heatmap_of_the_promised_size(trained, tmp_path):
    checkpoint, _, valid = trained
    text = "\n".join(valid[i : i + PERIOD] for i in range(0, 8 * PERIOD, PERIOD))
    result = run("python", "scripts/visualize_spans.py", "--checkpoint", checkpoint, "--text", text,
                 "--out", tmp_path / "spans", "--width", 900)  # fmt: skip
    assert "wrote" in result.stdout
    [rows] = page_rows(tmp_path / "spans.html")
    assert len(rows) == LAYERS and all(len(row) == len(text) for row in rows)
    assert re.fullmatch(r"token 12 '\\n': span [\d.]+", rows[1][12])  # the newline is </s>, hover shows span
    assert text in (tmp_path / "spans.html").read_text(encoding="utf-8")
    assert png_shape(tmp_path / "spans.png") == (TITLE_PX + ROW_PX * LAYERS + AXIS_PX, 900)

    edit = f"{valid[4 * PERIOD : 5 * PERIOD]}=ponmlkjihgfe"
    run("python", "scripts/visualize_spans.py", "--checkpoint", checkpoint, "--text", text, "--edit", edit,
        "--out", tmp_path / "edit.png")  # fmt: skip
    original, edited, change = page_rows(tmp_path / "edit.html")
    assert [len(panel) for panel in (original, edited, change)] == [LAYERS] * 3
    assert all(len(row) == len(text) for panel in (original, edited, change) for row in panel)
    assert change[0][0].endswith("(+0.0)")  # before the edit: the same span
    assert png_shape(tmp_path / "edit.png") == (3 * (TITLE_PX + ROW_PX * LAYERS + AXIS_PX), 1280)


@slow
def test_visualize_spans_reads_a_split_and_explains_bad_input(trained, tmp_path):
    checkpoint, data, valid = trained
    run("python", "scripts/visualize_spans.py", "--checkpoint", checkpoint, "--data", data, "--split", "valid",
        "--offset", 100, "--length", 50, "--out", tmp_path / "split", "--no-png")  # fmt: skip
    [rows] = page_rows(tmp_path / "split.html")
    assert [len(row) for row in rows] == [50] * LAYERS
    assert valid[100:150] in (tmp_path / "split.html").read_text(encoding="utf-8")
    assert not (tmp_path / "split.png").exists()
    for arguments, message in (
        (("--checkpoint", tmp_path / "missing.pt", "--text", "abc"), "missing.pt not found"),
        (("--checkpoint", checkpoint, "--text", "abc xyz"), "4 characters of the text are not in the model"),
    ):
        result = run("python", "scripts/visualize_spans.py", *arguments, "--out", tmp_path / "x", check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@slow
def test_memory_curve_more_memory_is_not_worse_and_is_kept(trained, tmp_path):
    checkpoint, _, _ = trained
    out = tmp_path / "curve"
    result = run("python", "scripts/memory_curve.py", "--checkpoint", checkpoint, "--split", "valid",
                 "--caps", 2, 8, 32, "--compare", 2, "none", "--top", 5, "--streams", 2, "--out", out)  # fmt: skip
    record = json.loads((out / "memory_curve.json").read_text())
    caps = record["caps"]
    assert [row["cap"] for row in caps] == ["2", "8", "32", "none"]
    bits = [row["bits_per_token"] for row in caps]
    memory = [row["mem_avg"] for row in caps]
    assert bits[0] > bits[-1] + 1.0, bits  # cap 2 (+ ramp 8) cannot see 12 back: copying fails
    assert all(later <= earlier + 0.05 for earlier, later in zip(bits, bits[1:])), bits
    assert memory == sorted(memory) and memory[0] == BLOCK and memory[-1] > BLOCK, memory
    assert len((out / "memory_curve.csv").read_text().splitlines()) == 1 + len(caps)
    assert png_shape(out / "memory_curve.png") == (512, 768)
    compare = record["compare"]
    assert compare["mean_gain_bits"] == pytest.approx(bits[0] - bits[-1], abs=1e-3)
    assert len(compare["top_tokens"]) == 5 and compare["top_tokens"][0]["gain_bits"] > 1
    assert f"cap 2 -> none: +{compare['mean_gain_bits']:.4f} bits per character" in result.stdout
