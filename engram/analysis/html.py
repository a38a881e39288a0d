"""A tiny, self-contained HTML page of "values over tokens": each token coloured by a value.

Design choices:
- One function returns the whole page as a string; `write_html` writes it atomically. The page
  has no external resources (inline CSS, a few lines of inline JS), so it opens offline, can be
  mailed, and is safe to archive next to a run.
- Colours are computed here (matplotlib colormaps, no pyplot): a sequential map for values such
  as gates in [0, 1], a diverging map centred on 0 for signed values such as loss deltas. Values
  outside [vmin, vmax] are clipped for the colour only; tooltips show the exact values.
- Several rows (e.g. one per Engram layer and branch) share the tokens; a selector recolours the
  text by another row (the colours of every row are precomputed into data attributes, so the
  script only swaps strings). `extra` rows appear in tooltips but are never used for colour, for
  quantities on another scale (e.g. the two losses behind a delta).
- Every piece of text (tokens, labels, notes, title) is HTML-escaped. Whitespace inside tokens is
  made visible: a space as a faint middle dot, a tab as an arrow, a newline as a return sign
  followed by a real line break; an empty token as an empty-set sign.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from engram.atomic import atomic_write_text

SEQUENTIAL_CMAP = "YlGnBu"
DIVERGING_CMAP = "RdBu_r"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.25em; }
.text { font-family: ui-monospace, monospace; font-size: 14px; line-height: 2.0;
        max-width: 110ch; }
.tok { white-space: pre; padding: 2px 0; border-radius: 2px; }
.ws { opacity: 0.45; }
.legend { display: flex; align-items: center; gap: 0.6em; margin: 0.8em 0; font-size: 13px; }
.bar { width: 260px; height: 14px; border: 1px solid #999; }
.notes { font-size: 13px; color: #444; }
"""

_JS = """
function engramShowRow(k) {
  document.querySelectorAll('.tok').forEach(function (s) {
    s.style.background = s.getAttribute('data-b' + k);
    s.style.color = s.getAttribute('data-f' + k);
  });
}
"""


def _hex(rgba: Sequence[float]) -> str:
    r, g, b = (round(255 * float(c)) for c in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_colour(rgba: Sequence[float]) -> str:
    r, g, b = (float(c) for c in rgba[:3])
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"


def _colours(
    values: Sequence[float], vmin: float, vmax: float, diverging: bool
) -> list[tuple[str, str]]:
    """(background, foreground) hex colours per value; NaN gets a neutral grey."""
    cmap = colormaps[DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP]
    if diverging:
        span = max(abs(vmin), abs(vmax)) or 1.0
        lo, hi = -span, span  # centred on 0: white means "no change"
    else:
        lo, hi = vmin, vmax if vmax > vmin else vmin + 1.0
    out = []
    for v in values:
        v = float(v)
        if math.isnan(v):
            out.append(("#dddddd", "#000000"))
            continue
        rgba = cmap(float(np.clip((v - lo) / (hi - lo), 0.0, 1.0)))
        out.append((_hex(rgba), _text_colour(rgba)))
    return out


def visible_whitespace(token: str) -> str:
    """The token as escaped HTML with its whitespace made visible (newlines also break the line)."""
    if token == "":
        return '<span class="ws">\u2205</span>'
    parts = []
    for ch in token:
        if ch == " ":
            parts.append('<span class="ws">\u00b7</span>')
        elif ch == "\t":
            parts.append('<span class="ws">\u2192</span>')
        elif ch == "\n":
            parts.append('<span class="ws">\u21b5</span>')
        elif ch == "\r":
            parts.append('<span class="ws">\u240d</span>')
        elif ord(ch) < 32 or ord(ch) == 127:
            parts.append(f'<span class="ws">\\x{ord(ch):02x}</span>')
        else:
            parts.append(html.escape(ch))
    return "".join(parts)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(float(v)) else f"{float(v):.4g}"


def token_heat_html(
    title: str,
    tokens: Sequence[str],
    rows: Mapping[str, Sequence[float]],
    *,
    vmin: float,
    vmax: float,
    diverging: bool = False,
    notes: Sequence[str] = (),
    extra: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """An HTML page showing `tokens` as text, each coloured by its value in the selected row.

    Args:
        title: page title and heading.
        tokens: the token strings, in order (whitespace kept; it is shown visibly).
        rows: label -> one value per token; the first row colours the page initially, a selector
            switches rows when there are several.
        vmin, vmax: the colour scale. With `diverging` the scale is symmetric around 0 with
            half-width max(|vmin|, |vmax|) (white = 0).
        notes: lines of plain text shown under the heading (escaped).
        extra: label -> one value per token, shown in tooltips only.
    """
    if not rows:
        raise ValueError("rows is empty; expected at least one row of values")
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax < vmin:
        raise ValueError(f"need finite vmin <= vmax, got vmin={vmin}, vmax={vmax}")
    extra = dict(extra or {})
    for name, vals in [*rows.items(), *extra.items()]:
        if len(vals) != len(tokens):
            raise ValueError(f"row {name!r} has {len(vals)} values, expected {len(tokens)} tokens")
    labels = list(rows)
    colours = [_colours(rows[k], vmin, vmax, diverging) for k in labels]
    esc = html.escape

    spans = []
    for i, tok in enumerate(tokens):
        tip = [f"#{i} {tok!r}"]
        tip += [f"{k}: {_fmt(rows[k][i])}" for k in labels]
        tip += [f"{k}: {_fmt(extra[k][i])}" for k in extra]
        attrs = "".join(
            f' data-b{j}="{colours[j][i][0]}" data-f{j}="{colours[j][i][1]}"'
            for j in range(len(labels))
        )
        bg, fg = colours[0][i]
        spans.append(
            f'<span class="tok" style="background:{bg};color:{fg}"{attrs} '
            f'title="{esc(chr(10).join(tip), quote=True)}">{visible_whitespace(tok)}</span>'
            + ("<br>" if tok.endswith("\n") else "")
        )

    lo, hi = (-max(abs(vmin), abs(vmax)), max(abs(vmin), abs(vmax))) if diverging else (vmin, vmax)
    stops = np.linspace(lo, hi, 11)
    grad = ", ".join(bg for bg, _ in _colours(stops, vmin, vmax, diverging))
    legend = (
        f'<div class="legend"><span>{esc(_fmt(lo))}</span>'
        f'<div class="bar" style="background:linear-gradient(to right, {grad})"></div>'
        f"<span>{esc(_fmt(hi))}</span></div>"
    )
    selector = ""
    if len(labels) > 1:
        options = "".join(f'<option value="{j}">{esc(k)}</option>' for j, k in enumerate(labels))
        selector = (
            '<p><label>colour by: <select onchange="engramShowRow(this.value)">'
            f"{options}</select></label></p>"
        )
    else:
        selector = f"<p>colour: {esc(labels[0])}</p>"
    note_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style><script>{_JS}</script></head>\n"
        f"<body><h1>{esc(title)}</h1>\n"
        + (f'<ul class="notes">{note_html}</ul>\n' if notes else "")
        + selector
        + legend
        + '\n<div class="text">'
        + "".join(spans)
        + "</div>\n"
        '<p class="notes">Hover a token for its values. Whitespace: \u00b7 space, \u2192 tab, '
        "\u21b5 newline.</p>\n</body></html>\n"
    )


def write_html(path: str | os.PathLike[str], html: str) -> Path:
    """Write the page `html` to `path` atomically (parent directories are created)."""
    atomic_write_text(path, html)
    return Path(path)
