"""The memory explorer's HTML page: counts, occupancy and collisions, and every query answered.

``memory_page`` renders a ``MemoryReport`` (``engram.analysis.memory_report``) as one self-contained
page: every text is escaped, the CSS is inline and the row-norm PNG is embedded as a data URI,
so the page loads no external resource. N-gram texts are shown in ``<code>`` with spaces kept
and line breaks and tabs written as ``\\n`` and ``\\t`` (``visible``).
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

from engram.analysis.memory_report import MemoryReport, NgramEntry, NgramReport, RowReport


def visible(text: str) -> str:
    """``text`` with line breaks and tabs written as ``\\n`` and ``\\t``."""
    return text.replace("\n", "\\n").replace("\t", "\\t")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _q(text: str) -> str:
    """An n-gram's text, escaped, spaces kept and line breaks shown as \\n."""
    return f"<code>{_e(visible(text))}</code>"


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}"
    return _e(x)


def _table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _colliders(entries: list[NgramEntry]) -> str:
    return "<br>".join(f"{_q(c.text)} ×{c.count}" for c in entries) or "–"


def _counts_section(report: MemoryReport) -> list[str]:
    """Title, provenance and the frequent n-gram counts per order."""
    c = report.counts
    return [
        f"<h1>Engram memory of {_e(report.run_name)} (step {report.step})</h1>",
        f"<p>Run <code>{_e(report.run_dir)}</code>; hash fingerprint "
        f"<code>{_e(report.hash_fingerprint[:16])}…</code>. Frequent n-grams: counted on "
        f"compressed ids over {c['n_tokens']:,} training tokens, kept when seen at least "
        f"{c['min_count']} times (counts {'reused from' if c['reused'] else 'written to'} "
        f"<code>{_e(c['cache'])}</code>).</p>",
        _table(
            ["order", "frequent n-grams", "distinct", "occurrences", "frequent mass"],
            [
                [
                    _e(n),
                    f"{o['frequent']:,}",
                    f"{o['distinct']:,}",
                    f"{o['total']:,}",
                    f"{o['frequent_mass']:,}",
                ]
                for n, o in c["orders"].items()
            ],
        ),
    ]


_LAYER_HEADER = [
    "head",
    "order",
    "p",
    "frequent u",
    "rows hit",
    "hit (uniform)",
    "mean collisions",
    "uniform (u-1)/p",
    "max on a row",
]


def _layer_section(s: dict[str, Any]) -> list[str]:
    """One layer's occupancy and collisions: a heading with its totals, a table of its heads."""
    heading = (
        f"<h3>Layer {s['layer_id']}: {s['rows_hit']:,} of {s['table_rows']:,} rows hit "
        f"({s['frac_rows_hit']:.1%}, uniform {s['expected_frac_rows_hit_uniform']:.1%}); "
        f"mean collisions {s['mean_collisions']:.3f} (uniform "
        f"{s['expected_collisions_uniform']:.3f})</h3>"
    )
    body = [
        [
            _e(h["head"]),
            _e(h["order"]),
            f"{h['table_size']:,}",
            f"{h['n_frequent']:,}",
            f"{h['frac_rows_hit']:.1%}",
            f"{h['expected_frac_rows_hit_uniform']:.1%}",
            f"{h['mean_collisions']:.3f}",
            f"{h['expected_collisions_uniform']:.3f}",
            _e(h["max_ngrams_on_a_row"]),
        ]
        for h in s["heads"]
    ]
    return [heading, _table(_LAYER_HEADER, body)]


_HIT_HEADER = [
    "layer",
    "head",
    "order",
    "n-gram",
    "count",
    "local row",
    "global row",
    "norm",
    "pct (layer)",
    "pct (head)",
    "colliding",
    "uniform",
    "top colliders",
]


def _ngram_section(rep: NgramReport) -> list[str]:
    """One queried n-gram: its tokenization, then what it reads in every (layer, head)."""
    heading = (
        f"<h2>N-gram {_q(rep.text)}</h2><p>tokenized as {_q(rep.tokenized)}: "
        + " | ".join(_q(t) for t in rep.tokens)
        + "</p>"
    )
    body = [
        [
            _e(h.layer_id),
            _e(h.head),
            _e(h.order),
            _q(h.ngram_text) + (" (padded)" if h.padded else ""),
            f"{h.count:,}" if h.frequent else "&lt; min",
            _e(h.local_row),
            _e(h.global_row),
            _fmt(h.norm),
            f"{h.norm_percentile:.1f}",
            f"{h.norm_percentile_head:.1f}",
            f"{h.n_colliding} (×{h.colliding_mass:,})",
            _fmt(h.expected_colliding_uniform),
            _colliders(h.top_colliders),
        ]
        for h in rep.hits
    ]
    return [heading, _table(_HIT_HEADER, body)]


def _row_section(rr: RowReport) -> list[str]:
    """One queried row: its norm and statistics, then the frequent n-grams hashed to it."""
    heading = (
        f"<h2>Row {rr.local_row} of layer {rr.layer_id}, head {rr.head} (order "
        f"{rr.order})</h2><p>global row {rr.global_row}, norm {_fmt(rr.norm)} "
        f"(percentile {rr.norm_percentile:.1f}); {rr.n_ngrams} frequent n-grams "
        f"(×{rr.mass:,}), uniform expectation {_fmt(rr.expected_ngrams_uniform)}.</p>"
    )
    body = [[_q(g.text), " | ".join(_q(t) for t in g.tokens), f"{g.count:,}"] for g in rr.ngrams]
    return [heading, _table(["n-gram", "tokens", "count"], body)]


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1300px}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 7px;font-size:13px;vertical-align:top}"
    "th{background:#f0f0f0}code{white-space:pre;background:#f6f6f6}"
    "img{max-width:100%}.note{color:#666;font-size:12px}"
)


def memory_page(report: MemoryReport, png: bytes) -> str:
    """The whole HTML page of ``report``, with ``png`` (the row-norm histograms) inline."""
    parts = _counts_section(report)
    parts += [
        "<h2>Occupancy and collisions</h2>",
        "<p>Collisions of an n-gram = other frequent n-grams of its order on the same row. "
        "Uniform hashing predicts (u-1)/p of them for u frequent n-grams in a sub-table of p "
        "rows, and a fraction 1-(1-1/p)<sup>u</sup> of rows hit.</p>",
    ]
    for s in report.layers:
        parts += _layer_section(s)
    parts.append(
        f'<h2>Row norms</h2><img alt="row norm histograms" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    )
    for rep in report.ngrams:
        parts += _ngram_section(rep)
    for rr in report.rows:
        parts += _row_section(rr)
    t = report.timings
    parts.append(
        "<p class=note>Timings: " + ", ".join(f"{_e(k)} {v:.2f} s" for k, v in t.items()) + "</p>"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Engram memory: {_e(report.run_name)}</title><style>{_STYLE}</style></head>"
        "<body>" + "\n".join(parts) + "</body></html>\n"
    )
