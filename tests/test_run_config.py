"""Run configs: json round trip, overrides with type checks, unknown keys named."""

from __future__ import annotations

import json

import pytest

from engram.presets import PRESETS, preset, tiny_engram
from engram.run_config import ConfigError, RunConfig, apply_overrides


def test_json_round_trip(tmp_path):
    cfg = tiny_engram()
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["engram"]["layer_ids"] == [1]


def test_overrides():
    cfg = apply_overrides(
        tiny_engram(),
        ["train.steps=9", "optim.lr=1e-3", "model.tie_embeddings=false", "batch_size=2",
         "engram.layer_ids=[0, 1]", "data.source=builtin:web", "name=x"],
    )  # fmt: skip
    assert cfg.train.steps == 9 and cfg.optim.lr == 1e-3 and not cfg.model.tie_embeddings
    assert cfg.data.batch_size == 2 and cfg.engram.layer_ids == (0, 1)
    assert cfg.data.source == "builtin:web" and cfg.name == "x"
    assert apply_overrides(cfg, ["engram=null"]).engram is None
    assert apply_overrides(cfg, ["optim.lr=1"]).optim.lr == 1.0  # ints widen to floats


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("nope.x=1", "unknown config section 'nope'"),
        ("seed=1", "ambiguous"),
        ("train.steps=abc", "train.steps expects an integer"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("model.n_heads=3", "invalid model config"),
        ("steps", "must look like section.field=value"),
        ("train.device=gpu0", "is not a torch device"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny_engram(), [override])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        RunConfig.load(tmp_path / "extra.json")


def test_presets_build():
    for name in ("tiny-moe", "tiny-engram", "dense", "demo-moe"):
        assert isinstance(preset(name), RunConfig)
    assert "demo-engram" in PRESETS
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
