"""The allocation and table-size sweeps: planned points, resumption, shared runs, outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engram.cli import main
from engram.presets import engram_template, tiny_moe
from engram.run import train
from engram.run_config import apply_overrides
from engram.sweep import SweepConfig, rho_curve, run_sweep, sweep_points, table_curve
from engram.train import read_metrics

TEMPLATE = replace(engram_template((1,)), n_embed_per_ngram=16, n_head_per_ngram=2)


def _base():
    return apply_overrides(tiny_moe(), ["train.steps=4", "train.eval_every=0"])


def _small_sweep(**kw):
    args = dict(rhos=(1.0, 0.5), table_scales=(0.5, 1.0), table_rho=0.5, tolerance=0.05)
    args.update(kw)
    return SweepConfig(**args)


def _files(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return (run_dir / "metrics.jsonl").read_text(), ckpts


def test_points_share_the_budget_and_the_table_backbone(analysis_env):
    base = _base()
    sweep = SweepConfig(rhos=(1.0, 0.75, 0.5, 0.25), table_scales=(0.25, 1.0, 4.0),
                        table_rho=0.5, tolerance=0.05)  # fmt: skip
    points = sweep_points(base, sweep, TEMPLATE)
    rho_pts = [(p, c) for p, c in points if p.kind == "rho"]
    table_pts = [(p, c) for p, c in points if p.kind == "table"]
    # rho = 1 is the baseline itself; every point keeps the total within the tolerance.
    first, first_cfg = rho_pts[0]
    assert first.rho == 1.0 and first.table_slots == 0 and first_cfg.engram is None
    assert first_cfg.model == base.model
    for p, _ in rho_pts:
        assert abs(p.total_params / first.total_params - 1) < 0.05
        assert abs(p.flops_per_token / first.flops_per_token - 1) < 0.05
    experts = [p.routed_experts for p, _ in rho_pts]
    assert experts == sorted(experts, reverse=True) and experts[0] == 8
    # The table sweep: one backbone, growing tables; its x1 point IS the rho=0.5 run.
    assert len({json.dumps(c.model.to_dict()) for _, c in table_pts}) == 1
    slots = [p.table_slots for p, _ in table_pts]
    assert slots == sorted(slots) and slots[0] < slots[1] < slots[2]
    x1 = next(p for p, _ in table_pts if p.table_scale == 1.0)
    assert x1.run == next(p.run for p, _ in rho_pts if p.rho == 0.5)
    assert len({p.run for p, _ in points}) == len(points) - 1


def test_sweep_trains_reports_and_resumes(analysis_env, tmp_path):
    out = tmp_path / "sweep"
    sweep = _small_sweep(second_text="builtin:bbe", second_batches=2)
    result = run_sweep(out, _base(), sweep, template=TEMPLATE, progress=False,
                       echo=lambda _: None)  # fmt: skip
    assert all(p.second_loss is not None and p.second_loss > 0 for p in result.points)
    x1 = next(c for c in table_curve(result.points) if c["table_scale"] == 1.0)
    assert x1["second_mean"] == next(p.second_loss for p in result.points if p.kind == "table"
                                     and p.table_scale == 1.0)  # fmt: skip
    runs = {p.run for p in result.points}
    assert len(runs) == 3  # rho1, rho0.5 (= table x1), rho0.5-table0.5x
    for p in result.points:
        final = [r["val_loss"] for r in read_metrics(out / p.run / "metrics.jsonl")
                 if "val_loss" in r][-1]  # fmt: skip
        assert p.val_loss == final and p.step == 4
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["rho"] for c in summary["rho_curve"]] == [1.0, 0.5]
    assert [c["table_scale"] for c in summary["table_curve"]] == [0.5, 1.0]
    assert summary["rho_curve"] == rho_curve(result.points)
    assert summary["table_curve"] == table_curve(result.points)
    for name in ("sweep_rho.png", "sweep_table.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second call trains nothing: every run is finished and re-reported as it was.
    before = {r: _files(out / r) for r in runs}
    again = run_sweep(out, _base(), sweep, template=TEMPLATE, progress=False,
                      echo=lambda _: None)  # fmt: skip
    assert [p.val_loss for p in again.points] == [p.val_loss for p in result.points]
    assert {r: _files(out / r) for r in runs} == before

    # Adding a rho trains only the new point.
    more = run_sweep(out, _base(), replace(sweep, rhos=(1.0, 0.5, 0.25)), template=TEMPLATE,
                     progress=False, echo=lambda _: None)  # fmt: skip
    assert {r: _files(out / r) for r in runs} == before
    assert len({p.run for p in more.points}) == 4


def test_interrupted_sweep_finishes_like_an_uninterrupted_one(analysis_env, tmp_path):
    sweep = _small_sweep(rhos=(0.5,), table_scales=())
    ((point, cfg),) = sweep_points(_base(), sweep, TEMPLATE)
    train(cfg, tmp_path / "a" / point.run, progress=False, stop_after=2)  # interrupted run
    a = run_sweep(tmp_path / "a", _base(), sweep, template=TEMPLATE, progress=False,
                  echo=lambda _: None)  # fmt: skip
    b = run_sweep(tmp_path / "b", _base(), sweep, template=TEMPLATE, progress=False,
                  echo=lambda _: None)  # fmt: skip
    assert a.points[0].val_loss == b.points[0].val_loss
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / point.run / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / point.run / "metrics.jsonl")]
    assert la == lb and len(la) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rhos=(1.5,)), "rho must be in"),
        (dict(rhos=(), table_scales=()), "nothing to sweep"),
        (dict(table_scales=(0.0,)), "positive"),
        (dict(table_rho=1.0), "no table"),
        (dict(seeds=(0, 0)), "distinct"),
    ],
)
def test_bad_sweep_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)


def test_cli_sweep_errors_are_one_line(capsys, analysis_env, tmp_path):
    assert main(["sweep", "--preset", "tiny-moe", "--out", str(tmp_path / "s"),
                 "--rhos", "1,abc"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("engram: error: --rhos must be comma-separated numbers")
    assert main(["sweep", "--preset", "tiny-engram", "--out", str(tmp_path / "s")]) == 2
    assert "must be an MoE" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_sweep_prints_the_result_as_json(capsys, analysis_env, tmp_path):
    argv = ["sweep", "--preset", "tiny-moe", "--out", str(tmp_path / "s"), "--rhos", "1,0.5",
            "--table-scales", "none", "--steps", "2", "--set", "train.eval_every=0",
            "--second-text", "none", "--no-progress", "--json"]  # fmt: skip
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert [c["rho"] for c in d["rho_curve"]] == [1.0, 0.5]
    assert d["table_curve"] == [] and "table_png" not in d["files"]
    assert all(p["step"] == 2 and p["val_loss"] > 0 for p in d["points"])
    assert (tmp_path / "s" / "sweep_rho.png").is_file()
