"""A run's loss on a second text: the run's tokenizer, the chosen split, cached per checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engram.data import PackedSplit, prepare_data
from engram.heldout import HELDOUT_FILE, heldout_loss
from engram.presets import tiny_engram
from engram.run import train
from engram.run_config import apply_overrides
from engram.train import evaluate, load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "heldout-cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "heldout-cache"))
        train(apply_overrides(tiny_engram(), ["train.steps=3"]), out, progress=False)
    return out


def test_second_text_loss_equals_evaluate_and_is_cached(run):
    rec = heldout_loss(run, "builtin:bbe", max_batches=3)
    parts, _ = load_trained(run)
    splits = prepare_data(
        replace(parts.cfg.data, source="builtin:bbe"), parts.tokenizer, parts.eot_id
    )
    expected = evaluate(parts.model, list(splits.val_batches(3)), parts.indexer)
    assert rec["loss"] == expected and rec["split"] == "val" and rec["step"] == 3
    assert rec["tokens"] == 3 * parts.cfg.data.batch_size * parts.cfg.data.seq_len
    cache = json.loads((run / HELDOUT_FILE).read_text())
    key = next(iter(cache))
    cache[key]["loss"] = 123.0  # a cached answer is returned without evaluating again
    (run / HELDOUT_FILE).write_text(json.dumps(cache))
    assert heldout_loss(run, "builtin:bbe", max_batches=3)["loss"] == 123.0
    assert heldout_loss(run, "builtin:bbe", max_batches=2)["loss"] != 123.0  # another key


def test_all_of_a_file(run, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("\n\n".join(f"A letter number {i} about the sea and ships." for i in range(60)))
    rec = heldout_loss(run, str(text), split="all")
    parts, _ = load_trained(run)
    splits = prepare_data(replace(parts.cfg.data, source=str(text)), parts.tokenizer, parts.eot_id)
    whole = PackedSplit.from_corpus(splits.corpus, range(splits.corpus.n_docs), "all")
    assert whole.n_tokens == splits.corpus.n_tokens > splits.train.n_tokens
    T = parts.cfg.data.seq_len
    assert rec["tokens"] == (whole.n_tokens - 1) // T * T
    with pytest.raises(ValueError, match="split must be one of"):
        heldout_loss(run, str(text), split="train")


def test_a_run_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        heldout_loss(tmp_path, "builtin:bbe")
