"""The gates report and the HTML token-heat writer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from engram.analysis.gate_report import analyze_gates, gate_rows, gates_report
from engram.analysis.gates import gate_values
from engram.analysis.html import token_heat_html, write_html
from engram.analysis.runs import NoEngramError
from engram.config import EngramConfig
from engram.demo import GATE_SENTENCE
from engram.indexer import NgramIndexer
from engram.model import EngramLM, ModelConfig
from engram.tokenizer import EOT_ID
from engram.train import load_trained

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


# -------------------------------------------------------------------------------------- html
def test_html_escapes_tokens_and_shows_whitespace(tmp_path) -> None:
    tokens = ["<script>", " a&b", "\n", '"q"', "\t", ""]
    page = token_heat_html(
        "title <b>", tokens, {"gate <1>": [0.0, 0.5, 1.0, 0.2, 0.3, float("nan")], "other": [1] * 6},
        vmin=0.0, vmax=1.0, notes=["note & <i>"], extra={"x": [1, 2, 3, 4, 5, 6]},
    )  # fmt: skip
    assert "&lt;script&gt;" in page and page.count("<script") == 1  # only the page's own script
    assert "<b>" not in page and "&lt;b&gt;" in page and "note &amp; &lt;i&gt;" in page
    assert "gate &lt;1&gt;" in page and "a&amp;b" in page and "&quot;q&quot;" in page
    assert "\u21b5</span></span><br>" in page  # the newline is visible, then breaks the line
    assert "\u00b7" in page and "\u2192" in page and "\u2205" in page  # space, tab, empty token
    assert page.count('class="tok"') == len(tokens)
    assert "<select" in page  # two rows: a selector
    assert not re.search(r"(src|href)\s*=|https?://|@import", page)  # self-contained
    # tooltips carry every row's value, the extra row's included
    tip = re.search(r'title="([^"]*)">(?:<span class="ws">)?&lt;script', page)
    assert tip and "gate &lt;1&gt;: 0" in tip.group(1) and "x: 1" in tip.group(1)
    path = write_html(tmp_path / "sub" / "p.html", page)
    assert path.read_text(encoding="utf-8") == page


def test_html_diverging_colours_and_errors() -> None:
    page = token_heat_html("d", ["a", "b", "c"], {"delta": [-1.0, 0.0, 1.0]}, vmin=-1, vmax=1,
                           diverging=True)  # fmt: skip
    colours = re.findall(r'class="tok" style="background:(#[0-9a-f]{6})', page)
    assert len(colours) == 3 and len(set(colours)) == 3
    mid = colours[1]
    assert all(int(mid[i : i + 2], 16) > 230 for i in (1, 3, 5))  # zero is (near) white
    with pytest.raises(ValueError, match="row 'delta' has 2 values, expected 3"):
        token_heat_html("d", ["a", "b", "c"], {"delta": [0, 1]}, vmin=0, vmax=1)
    with pytest.raises(ValueError, match="rows is empty"):
        token_heat_html("d", ["a"], {}, vmin=0, vmax=1)


# ------------------------------------------------------------------------------ on a real run
@pytest.fixture(scope="module")
def engram_run(tiny_runs, analysis_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(analysis_cache))
        parts, _ = load_trained(tiny_runs["engram"])
    return parts


def test_report_gates_equal_gate_values(analysis_env, tiny_runs, engram_run, tmp_path) -> None:
    report = analyze_gates(tiny_runs["engram"], tmp_path)
    ref = gate_values(engram_run.model, engram_run.indexer, GATE_SENTENCE)
    assert report.text == GATE_SENTENCE and report.reading.tokens == ref.tokens
    assert list(report.reading.gates) == list(ref.gates) == [1]
    for lid, g in ref.gates.items():
        np.testing.assert_array_equal(report.reading.gates[lid], g)
    for path in (report.png, report.html, report.json):
        assert path.parent == tmp_path and path.is_file()
    assert report.png.read_bytes()[:8] == PNG_MAGIC
    data = json.loads(report.json.read_text(encoding="utf-8"))
    assert data["tokens"] == ref.tokens and not data["truncated"]
    assert data["n_tokens_read"] == data["n_tokens_text"] == len(ref.tokens)
    np.testing.assert_allclose(data["gates"]["1"], ref.gates[1], atol=1e-4)
    np.testing.assert_allclose(data["rows"]["layer 1"], ref.gates[1][:, 0], atol=1e-4)
    mean = ref.gates[1][:, 0]
    high, low = data["ranking"]["highest"], data["ranking"]["lowest"]
    assert high[0]["position"] == int(np.argmax(mean)) and low[0]["position"] == int(
        np.argmin(mean)
    )
    assert [h["mean_gate"] for h in high] == sorted((h["mean_gate"] for h in high), reverse=True)
    assert high[0]["token"] == ref.tokens[high[0]["position"]]
    assert data["source"]["step"] == 6
    page = report.html.read_text(encoding="utf-8")
    assert page.count('class="tok"') == len(ref.tokens)


def test_long_text_is_refused_or_truncated(analysis_env, engram_run, tmp_path) -> None:
    limit = engram_run.model.cfg.max_seq_len
    text = " ".join(["And the king of Babylon <went> up."] * 20)
    n = len(engram_run.indexer.encode(text))
    assert n > limit
    with pytest.raises(ValueError, match=f"the text is {n} tokens .* max_seq_len={limit}"):
        gates_report(engram_run.model, engram_run.indexer, tmp_path, text)
    assert not (tmp_path / "gates.json").exists()
    report = gates_report(engram_run.model, engram_run.indexer, tmp_path, text, truncate=True)
    data = json.loads(report.json.read_text(encoding="utf-8"))
    assert data["truncated"] and data["n_tokens_text"] == n and data["n_tokens_read"] == limit
    # the first sentence is a prefix of the text's tokens; the model is causal, so its gates
    # read alone equal the first gates of the truncated read
    ref = gate_values(engram_run.model, engram_run.indexer, "And the king of Babylon <went> up.")
    k = len(ref.tokens)
    assert report.reading.tokens[:k] == ref.tokens and len(report.reading.tokens) == limit
    np.testing.assert_allclose(report.reading.gates[1][:k], ref.gates[1], atol=1e-5)
    page = report.html.read_text(encoding="utf-8")
    assert "&lt;" in page and "&gt;" in page and "<went" not in page and f"first {limit}" in page


def test_baseline_and_empty_text_are_refused(analysis_env, tiny_runs, engram_run, tmp_path):
    with pytest.raises(NoEngramError, match=r"no Engram layers.*gates report"):
        analyze_gates(tiny_runs["moe"], tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    with pytest.raises(ValueError, match="text is empty"):
        gates_report(engram_run.model, engram_run.indexer, tmp_path, "  ")


def test_hyper_connection_branches(gpt2_tokenizer, gpt2_compressor, tmp_path) -> None:
    """M=2 branches and two Engram layers: one heatmap/html/json row per (layer, branch)."""
    ecfg = EngramConfig(
        engram_vocab_size=(101, 103), max_ngram_size=3, n_embed_per_ngram=16,
        n_head_per_ngram=2, layer_ids=(0, 1), pad_id=EOT_ID,
    )  # fmt: skip
    indexer = NgramIndexer(ecfg, gpt2_compressor, gpt2_tokenizer, sep_id=EOT_ID)
    cfg = ModelConfig(
        vocab_size=50257, d_model=16, n_layers=2, n_heads=2, max_seq_len=64, ffn="dense",
        d_ff=32, hc_mult=2,
    )  # fmt: skip
    sizes = {lid: indexer.hasher.flat_table_sizes(lid) for lid in ecfg.layer_ids}
    model = EngramLM(cfg, ecfg, sizes, seed=0)
    report = gates_report(model, indexer, tmp_path)
    ref = gate_values(model, indexer, GATE_SENTENCE)
    T = len(ref.tokens)
    for lid in (0, 1):
        assert report.reading.gates[lid].shape == (T, 2)
        np.testing.assert_array_equal(report.reading.gates[lid], ref.gates[lid])
        assert not np.allclose(ref.gates[lid][:, 0], ref.gates[lid][:, 1])  # distinct branches
    labels = ["layer 0 branch 0", "layer 0 branch 1", "layer 1 branch 0", "layer 1 branch 1"]
    assert list(gate_rows(report.reading)) == labels
    data = json.loads(report.json.read_text(encoding="utf-8"))
    assert list(data["rows"]) == labels and np.asarray(data["gates"]["1"]).shape == (T, 2)
    np.testing.assert_allclose(
        data["mean_gate"], np.mean([g for g in ref.gates.values()], axis=(0, 2)), atol=1e-4
    )
    page = report.html.read_text(encoding="utf-8")
    assert all(f">{label}</option>" in page for label in labels)
    assert report.png.read_bytes()[:8] == PNG_MAGIC
