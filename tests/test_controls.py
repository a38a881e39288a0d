"""Control addressings and frozen tables: content-free rows, positions through the pipeline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.addressing import constant_rows, position_rows, splitmix64
from engram.checkpoint import (
    CheckpointError,
    check_fingerprint,
    load_optimizer_state,
    read_checkpoint,
)
from engram.config import EngramConfig
from engram.data import BatchLoader, prepare_data
from engram.indexer import NgramIndexer
from engram.presets import tiny_engram
from engram.run import train
from engram.run_config import apply_overrides
from engram.train import build_run, load_trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ctl-cache"))


def test_splitmix64_golden_values():
    # Reference values of splitmix64 seeded with 0 (the state advances by the golden gamma).
    out = splitmix64(np.array([0, 0x9E3779B97F4A7C15], dtype=np.uint64))
    assert [hex(int(v)) for v in out] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(2, 50_000), min_size=1, max_size=6),
    st.integers(0, 2**40),
    st.integers(0, 5),
)
def test_position_rows_in_range_and_deterministic(sizes, first, seed):
    table = np.array([sizes, sizes[::-1]], dtype=np.int64)  # (L=2, H)
    pos = first + np.arange(24, dtype=np.int64).reshape(2, 12)
    rows = position_rows(pos, table, seed)
    assert rows.shape == (2, 2, 12, len(sizes)) and rows.dtype == np.int64
    assert (rows >= 0).all() and (rows < table[:, None, None, :]).all()
    assert np.array_equal(rows, position_rows(pos, table, seed))


def test_position_rows_cover_the_table_uniformly_and_ignore_content():
    sizes = np.array([[97, 101]], dtype=np.int64)
    pos = np.arange(97 * 101 * 4, dtype=np.int64)[None, :]
    rows = position_rows(pos, sizes)[0, 0]  # (T, H)
    for h, size in enumerate((97, 101)):
        counts = np.bincount(rows[:, h], minlength=size)
        assert counts.min() > 0  # every row is read
        assert counts.max() < 3 * counts.mean()  # and none far more often than the mean
    assert not np.array_equal(rows[:, 0], rows[:, 1] % 97)  # heads address independently


def test_position_rows_refuse_bad_input():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        position_rows(np.arange(5), np.array([[7]]))
    with pytest.raises(ValueError, match="non-negative"):
        position_rows(-np.ones((1, 2), dtype=np.int64), np.array([[7]]))


def test_indexer_addressings(gpt2_compressor):
    base = EngramConfig(
        engram_vocab_size=(101, 101), n_embed_per_ngram=8, n_head_per_ngram=2,
        layer_ids=(1, 2), pad_id=50256,
    )  # fmt: skip
    ids = np.array([[464, 5822, 286, 8488], [464, 5822, 286, 11]], dtype=np.int64)
    ngram = NgramIndexer(base, gpt2_compressor, sep_id=50256)
    const = NgramIndexer(replace(base, addressing="constant"), gpt2_compressor, sep_id=50256)
    posx = NgramIndexer(replace(base, addressing="position"), gpt2_compressor, sep_id=50256)
    assert np.array_equal(const.rows(ids), constant_rows(2, 2, 4, 4))
    # position rows ignore the tokens: two different sequences, the same rows
    assert np.array_equal(posx.rows(ids)[:, 0], posx.rows(ids)[:, 1])
    assert not np.array_equal(ngram.rows(ids)[:, 0, 3], ngram.rows(ids)[:, 1, 3])
    pos = np.array([[10, 11, 12, 13], [0, 1, 2, 3]])
    assert np.array_equal(posx.rows(ids, positions=pos)[:, 1], posx.rows(ids)[:, 0])
    t = posx.rows(torch.from_numpy(ids), positions=torch.from_numpy(pos))
    assert isinstance(t, torch.Tensor) and torch.equal(
        t, torch.from_numpy(posx.rows(ids, positions=pos))
    )
    with pytest.raises(ValueError, match="shape"):
        posx.rows(ids, positions=pos[:, :2])
    # the fingerprint tells a control's tables from real n-gram tables
    fps = {ix.fingerprint() for ix in (ngram, const, posx)}
    assert len(fps) == 3 and ngram.fingerprint() == ngram.hasher.fingerprint()
    with pytest.raises(ValueError, match="addressing must be one of"):
        replace(base, addressing="random")


def test_loader_and_validation_pass_stream_positions(gpt2_tokenizer):
    cfg = apply_overrides(tiny_engram(), ["engram.addressing=position"])
    parts = build_run(cfg, gpt2_tokenizer)
    data = prepare_data(cfg.data, gpt2_tokenizer, parts.eot_id)
    with BatchLoader(data, cfg.data, parts.indexer, start_step=5, seed=3) as loader:
        batch = next(loader)
    T = cfg.data.seq_len
    starts = data.train.train_starts(5, cfg.data.batch_size, T, 3)
    pos = starts[:, None] + np.arange(T)
    assert np.array_equal(batch.rows.numpy(), parts.indexer.rows(batch.x.numpy(), positions=pos))
    x, y = data.train.windows(starts, T)
    assert np.array_equal(batch.x.numpy(), x) and np.array_equal(batch.y.numpy(), y)
    plain = list(data.val_batches(2))
    with_pos = list(data.val_batches(2, with_positions=True))
    for (x0, y0), (x1, y1, p1) in zip(plain, with_pos, strict=True):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
        assert np.array_equal(p1[:, 0] // T, np.arange(len(p1)) + p1[0, 0] // T)
        assert np.array_equal(data.val.tokens[p1], x1)  # positions index the val stream


def test_frozen_tables_keep_their_init_and_resume_exactly(tmp_path):
    cfg = apply_overrides(
        tiny_engram(), ["optim.table_lr_mult=0", "train.steps=6", "train.ckpt_every=3"]
    )
    init = build_run(cfg).model.state_dict()
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_after=3)
    train(cfg, tmp_path / "split", progress=False)
    full, _ = load_trained(tmp_path / "full")
    split, _ = load_trained(tmp_path / "split")
    tables = [k for k in init if k.endswith("store.weight")]
    assert tables
    for k, v in full.model.state_dict().items():
        if k in tables:
            assert torch.equal(v, init[k]), k  # never trained
        assert torch.equal(v, split.model.state_dict()[k]), k  # resumed == uninterrupted
    assert not torch.equal(
        full.model.state_dict()["tok_emb.weight"], init["tok_emb.weight"]
    )  # everything else trains
    optim_state = load_optimizer_state(read_checkpoint(tmp_path / "full"))
    assert set(optim_state) == {"dense"}  # no optimizer state for a frozen table


def test_control_checkpoint_refuses_ngram_addressing(tmp_path):
    cfg = apply_overrides(tiny_engram(), ["engram.addressing=constant", "train.steps=2"])
    train(cfg, tmp_path / "ctl", progress=False)
    ckpt = read_checkpoint(tmp_path / "ctl")
    ngram = build_run(tiny_engram())
    with pytest.raises(CheckpointError, match="hash configuration"):
        check_fingerprint(ckpt, ngram.hash_fingerprint)


def test_frozen_table_trained_on_disk_stays_at_its_init(tmp_path):
    cfg = apply_overrides(
        tiny_engram(), ["optim.table_lr_mult=0", "train.steps=3", 'train.table_store="mmap"']
    )
    init = build_run(cfg).model.engram_layers()[1].store.weight
    train(cfg, tmp_path / "disk", progress=False)
    parts, _ = load_trained(tmp_path / "disk")
    store = parts.model.engram_layers()[1].store
    assert torch.equal(store.gather(torch.arange(init.shape[0])), init)
