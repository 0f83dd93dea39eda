"""Per-token expire-spans drawn as text (an HTML page) and as a heatmap (a PNG), like the paper's Figures 9 and 12.

Both use one colour scale, logarithmic in the span (``log(1 + e) / log(1 + L)``): most spans are short and a few
are very long, and a linear scale would show only the long ones. "Edit the past" (Figure 9 b/c) runs a text and
an edited copy and colours the change of each token's span (red: kept longer after the edit, blue: shorter).
"""

import difflib
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .runner import AnalysisError, BlockRun

SPAN_COLOURS = ("#ffffff", "#a50f15")  # span 0 .. L
CHANGE_COLOURS = ("#2166ac", "#ffffff", "#b2182b")  # shorter .. unchanged .. longer
NEW_TOKEN_COLOUR = "#d9d9d9"  # edited tokens that have no counterpart in the original
# PNG geometry (pixels): every panel is a title, one row per layer and an axis of token positions.
ROW_PX, TITLE_PX, AXIS_PX, LEFT_PX, RIGHT_PX = 32, 28, 44, 120, 110
DPI = 64  # a power of two: width / DPI inches times DPI gives back exactly the pixels asked for
LABEL_PX = 9  # tokens get their character under the heatmap when each has at least this many pixels


@dataclass
class SpanPanel:
    """Rows (one per layer) of spans over one token sequence, drawn the same way in the HTML and the PNG.

    With ``baseline`` (the original's spans aligned to these tokens, NaN for new ones) the colour is the change
    ``values - baseline``.
    """

    title: str
    strings: List[str]  # N display strings (Vocabulary.token_strings)
    values: Tensor  # layers x N
    baseline: Optional[Tensor] = None  # layers x N

    @property
    def shows_change(self) -> bool:
        return self.baseline is not None

    def colour_values(self) -> Tensor:  # layers x N
        return self.values - self.baseline if self.shows_change else self.values


def apply_edit(text: str, edit: str) -> Tuple[str, int]:
    """``text`` with the first whole-word occurrence of OLD replaced by NEW (``edit`` is "OLD=NEW"), and where.

    One change in the past: every token after it may keep or forget differently (Figure 9 b/c).
    """
    old, separator, new = edit.partition("=")
    if not separator or not old:
        raise AnalysisError(f"--edit {edit!r} is not OLD=NEW: write e.g. --edit Paris=Rome")
    found = re.search(rf"(?<!\w){re.escape(old)}(?!\w)", text)
    if found is None:
        raise AnalysisError(f"--edit: the word {old!r} does not occur in the text; pick one that does")
    return text[: found.start()] + new + text[found.end() :], found.start()


def aligned_baseline(original: BlockRun, edited: BlockRun) -> Tensor:
    """The original's spans of the edited text's tokens (layers x N_edited), NaN for tokens the edit added.

    Tokens are matched by a diff of the two token sequences, so a longer or shorter NEW shifts the rest.
    """
    matcher = difflib.SequenceMatcher(None, original.tokens.tolist(), edited.tokens.tolist(), autojunk=False)
    baseline = torch.full_like(edited.spans, float("nan"))
    for start_original, start_edited, size in matcher.get_matching_blocks():
        baseline[:, start_edited : start_edited + size] = original.spans[
            :, start_original : start_original + size
        ]
    return baseline


def layer_summary(run: BlockRun) -> List[dict]:
    """Per layer: mean and largest span of the tokens, and the memory the layer kept (mean over blocks)."""
    return [
        {
            "layer": layer + 1,
            "span_avg": float(spans.mean()),
            "span_max": float(spans.max()),
            "mem": float(run.mem_per_layer[layer]),
        }
        for layer, spans in enumerate(run.spans)
    ]


# --- colours ------------------------------------------------------------------------------------------------------


def _log_fraction(values: np.ndarray, max_span: int) -> np.ndarray:
    """Signed ``log(1 + |v|) / log(1 + L)``: 0 for 0, +-1 for +-L."""
    return np.sign(values) * np.log1p(np.abs(values)) / np.log1p(max_span)


def _mix(colours: Sequence[str], fraction: float) -> str:
    """The colour at ``fraction`` (0..1) along evenly spaced ``colours``."""
    rgb = np.array([[int(colour[i : i + 2], 16) for i in (1, 3, 5)] for colour in colours], dtype=float)
    position = min(max(fraction, 0.0), 1.0) * (len(colours) - 1)
    low = min(int(position), len(colours) - 2)
    mixed = rgb[low] + (rgb[low + 1] - rgb[low]) * (position - low)
    return "#" + "".join(f"{round(channel):02x}" for channel in mixed)


def _css_colours(value: float, change: bool, max_span: int) -> Tuple[str, str]:
    """(background, text colour) of one token."""
    if np.isnan(value):
        return NEW_TOKEN_COLOUR, "#000000"
    fraction = float(_log_fraction(np.array(value), max_span))
    if change:
        return _mix(CHANGE_COLOURS, (fraction + 1) / 2), "#ffffff" if abs(fraction) > 0.6 else "#000000"
    return _mix(SPAN_COLOURS, fraction), "#ffffff" if fraction > 0.6 else "#000000"


# --- HTML ---------------------------------------------------------------------------------------------------------


def _shown(string: str) -> str:
    """What a token looks like in the page: newlines as a visible mark before the break, partial bytes as a dot."""
    if string == "":
        return "\N{MIDDLE DOT}"
    return string.replace("\n", "\N{DOWNWARDS ARROW WITH CORNER LEFTWARDS}\n")


def _token_title(position: int, string: str, value: float, before: Optional[float]) -> str:
    if before is None:
        return f"token {position} {string!r}: span {value:.1f}"
    if np.isnan(before):
        return f"token {position} {string!r}: span {value:.1f} (not in the original)"
    return f"token {position} {string!r}: span {before:.1f} -> {value:.1f} ({value - before:+.1f})"


def _panel_html(panel: SpanPanel, max_span: int) -> str:
    rows = []
    colour_values = panel.colour_values().numpy()
    for layer, values in enumerate(panel.values.numpy()):
        tokens = []
        for position, (string, value) in enumerate(zip(panel.strings, values)):
            before = float(panel.baseline[layer, position]) if panel.shows_change else None
            background, foreground = _css_colours(
                colour_values[layer, position], panel.shows_change, max_span
            )
            title = html.escape(_token_title(position, string, float(value), before))
            tokens.append(
                f'<span class="t" style="background:{background};color:{foreground}" title="{title}">'
                f"{html.escape(_shown(string), quote=False)}</span>"
            )
        rows.append(
            f'<div class="layer"><div class="label">layer {layer + 1}<br><small>mean span '
            f'{np.nanmean(values):.1f}</small></div><div class="tokens">{"".join(tokens)}</div></div>'
        )
    return f'<section class="panel"><h2>{html.escape(panel.title)}</h2>\n' + "\n".join(rows) + "</section>"


def _legend_html(max_span: int, change: bool) -> str:
    marks = [0] + [10**k for k in range(int(np.log10(max_span)) + 1)] + [max_span]
    marks = sorted(set(marks))
    if change:
        marks = [-mark for mark in reversed(marks[1:])] + marks
    swatches = []
    for mark in marks:
        background, foreground = _css_colours(float(mark), change, max_span)
        label = f"{mark:+d}" if change and mark else str(mark)
        swatches.append(
            f'<span class="swatch" style="background:{background};color:{foreground}">{label}</span>'
        )
    name = "change of span (edited - original)" if change else "span"
    return f'<p class="legend">{name}: {" ".join(swatches)}</p>'


STYLE = """
body { font-family: sans-serif; margin: 1.5em; } pre.text { white-space: pre-wrap; background: #f6f6f6; padding: 0.8em; }
.layer { display: flex; margin-bottom: 0.8em; } .label { flex: 0 0 7em; font-size: 0.9em; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.6; } .t { padding: 1px 0; }
.swatch { padding: 1px 4px; font-family: monospace; }
"""


def spans_html(panels: List[SpanPanel], heading: str, max_span: int, texts: List[Tuple[str, str]]) -> str:
    """A self-contained page: one row per layer for each panel (hover a token for its span), then the texts."""
    legends = _legend_html(max_span, change=False)
    if any(panel.shows_change for panel in panels):
        legends += _legend_html(max_span, change=True)
    body = [f"<h1>{html.escape(heading)}</h1>", legends, *(_panel_html(panel, max_span) for panel in panels)]
    body += [
        f"<h2>{html.escape(name)}</h2><pre class='text'>{html.escape(text)}</pre>" for name, text in texts
    ]
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(heading)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --- PNG ----------------------------------------------------------------------------------------------------------


def new_figure(width: int, height: int):
    """A matplotlib figure of exactly ``width x height`` pixels, drawn with Agg (no GUI, no pyplot state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise AnalysisError(
            "drawing PNGs needs matplotlib: pip install fairseq-expire[viz] (or pip install matplotlib)"
        ) from error
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def heatmap_size(panels: List[SpanPanel], width: int) -> Tuple[int, int]:
    """(width, height) in pixels: per panel a title, ``ROW_PX`` per layer and an axis."""
    return width, sum(TITLE_PX + ROW_PX * len(panel.values) + AXIS_PX for panel in panels)


def _tick_label(string: str) -> str:
    return {"\n": "\N{DOWNWARDS ARROW WITH CORNER LEFTWARDS}", " ": "\N{OPEN BOX}", "": "\N{MIDDLE DOT}"}.get(
        string, string
    )


def _bar_ticks(max_span: int, change: bool, layers: int) -> List[int]:
    """Colour bar marks that fit the panel's height: powers of ten, fewer on short panels."""
    if layers < 2:
        return [-max_span, 0, max_span] if change else [0, max_span]
    if change:
        return sorted({-max_span, -min(10, max_span), 0, min(10, max_span), max_span})
    return sorted({0, *(10**k for k in range(1, len(str(max_span)))), max_span})


def spans_png(panels: List[SpanPanel], path: Path, heading: str, max_span: int, width: int = 1280):
    """A heatmap, layers x tokens per panel, of exactly :func:`heatmap_size` pixels."""
    width, height = heatmap_size(panels, width)
    figure = new_figure(width, height)
    from matplotlib import rc_context
    from matplotlib.colors import FuncNorm, LinearSegmentedColormap

    def scale(values):
        return _log_fraction(np.asarray(values, dtype=float), max_span)

    def unscale(fractions):
        return np.sign(fractions) * np.expm1(np.abs(fractions) * np.log1p(max_span))

    with rc_context({"font.size": 13}):
        top = height
        for panel in panels:
            layers, tokens = panel.values.shape
            rows_top = top - TITLE_PX
            bottom, rows_height = rows_top - ROW_PX * layers, ROW_PX * layers
            axes = figure.add_axes(
                [LEFT_PX / width, bottom / height, (width - LEFT_PX - RIGHT_PX) / width, rows_height / height]
            )
            bar = figure.add_axes(
                [(width - RIGHT_PX + 14) / width, bottom / height, 14 / width, rows_height / height]
            )
            colours = CHANGE_COLOURS if panel.shows_change else SPAN_COLOURS
            colour_map = LinearSegmentedColormap.from_list("spans", colours).with_extremes(
                bad=NEW_TOKEN_COLOUR
            )
            low = -max_span if panel.shows_change else 0
            image = axes.imshow(
                panel.colour_values().numpy(),
                aspect="auto",
                interpolation="nearest",
                cmap=colour_map,
                norm=FuncNorm((scale, unscale), vmin=low, vmax=max_span),
            )
            colour_bar = figure.colorbar(
                image, cax=bar, ticks=_bar_ticks(max_span, panel.shows_change, layers)
            )
            colour_bar.ax.tick_params(labelsize=10)
            axes.set_yticks(range(layers), [f"layer {layer + 1}" for layer in range(layers)])
            axes.set_title(f"{heading}: {panel.title}" if panel is panels[0] else panel.title, loc="left")
            if (width - LEFT_PX - RIGHT_PX) / tokens >= LABEL_PX:
                axes.set_xticks(range(tokens), [_tick_label(string) for string in panel.strings], fontsize=10)
            axes.set_xlabel("token", fontsize=10, labelpad=2)
            top = bottom - AXIS_PX
        figure.savefig(path, dpi=DPI)
