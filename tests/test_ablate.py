"""`engram ablate`: arms, paired statistics, resumption, jobs-independent results, the CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from engram.ablate import (
    AblationConfig,
    AblationResult,
    Arm,
    ArmResult,
    build_arms,
    capacity_fit,
    paired,
    run_ablation,
)
from engram.cli import main
from engram.cli.common import scale_list
from engram.presets import run_shape, tiny_engram, tiny_moe
from engram.run import train
from engram.run_config import ConfigError, apply_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ablate-cache"))


def _run_cfg():
    return apply_overrides(tiny_engram(), ["train.steps=3", "train.threads=1"])


def test_arms_change_one_thing_each():
    cfg = _run_cfg()
    arms = {a.name: a for a in build_arms(cfg, AblationConfig(capacity_scales=(0.25,)), tiny_moe())}
    assert list(arms) == [
        "engram", "no-information", "address", "capacity-x0.25", "frozen", "experts", "baseline",
    ]  # fmt: skip
    base = cfg.to_dict()

    def diff(a: Arm) -> dict:
        d = a.cfg.to_dict()
        return {
            (s, k): d[s][k] if d[s] else None
            for s in ("model", "engram", "optim", "train", "data")
            for k in (base[s] or {})
            if d[s] is None or d[s][k] != base[s][k]
        }

    assert diff(arms["engram"]) == {}
    assert diff(arms["no-information"]) == {("engram", "addressing"): "constant"}
    assert diff(arms["address"]) == {("engram", "addressing"): "position"}
    assert diff(arms["frozen"]) == {("optim", "table_lr_mult"): 0.0}
    assert set(diff(arms["capacity-x0.25"])) == {("engram", "engram_vocab_size")}
    assert arms["capacity-x0.25"].table_slots < arms["engram"].table_slots / 3
    assert arms["experts"].cfg.engram is None
    assert arms["experts"].cfg.model == cfg.model  # the Engram model's experts, no memory
    assert arms["no-information"].total_params == arms["engram"].total_params
    assert run_shape(cfg)[1] == arms["engram"].table_slots


def test_refusals():
    with pytest.raises(ConfigError, match="no Engram memory"):
        build_arms(tiny_moe(), AblationConfig(), None)
    ctl = apply_overrides(tiny_engram(), ["engram.addressing=constant"])
    with pytest.raises(ConfigError, match="itself a control"):
        build_arms(ctl, AblationConfig(), None)
    with pytest.raises(ValueError, match="unknown controls"):
        AblationConfig(controls=("magic",))
    with pytest.raises(ValueError, match="not 1"):
        AblationConfig(capacity_scales=(1.0,))
    # --capacity's parser (the one place that reads "1/16"-style scales)
    assert scale_list("1/64, 0.25,1/16") == (1 / 64, 0.25, 1 / 16)
    with pytest.raises(argparse.ArgumentTypeError, match="positive numbers"):
        scale_list("1/0")


def _arm_result(name, val, scale=None, slots=100):
    arm = Arm(name, name, tiny_engram(), slots, 1, 1, scale)
    return ArmResult(arm, val=dict(enumerate(val)))


def test_paired_statistics_and_the_clear_rule():
    eng = _arm_result("engram", [3.00, 3.10, 3.05])
    far = _arm_result("no-information", [3.50, 3.62, 3.51])
    near = _arm_result("capacity-x0.25", [3.02, 3.09, 3.10])
    c = paired(eng, far)
    assert c["diffs"] == pytest.approx([0.50, 0.52, 0.46])
    assert c["mean"] == pytest.approx(0.49333, abs=1e-4)
    assert c["std"] == pytest.approx(np.std([0.5, 0.52, 0.46], ddof=1))
    seed_std = max(np.std([3.0, 3.1, 3.05], ddof=1), np.std([3.5, 3.62, 3.51], ddof=1))
    assert c["seed_std"] == pytest.approx(seed_std) and c["clear"] is True
    assert paired(eng, near)["clear"] is False
    one = paired(_arm_result("engram", [3.0]), _arm_result("x", [3.5]))
    assert one["clear"] is None and one["std"] is None


def test_capacity_fit_recovers_a_log_linear_slope():
    arms = [
        _arm_result(f"c{s}", [5.0 - 0.03 * np.log2(slots)], scale=s, slots=slots)
        for s, slots in ((0.25, 1000), (0.5, 2000), (1.0, 4000))
    ]
    fit = capacity_fit(AblationResult(None, AblationConfig(), None, arms))  # type: ignore[arg-type]
    assert fit["per_doubling"] == pytest.approx(-0.03) and fit["rms_residual"] < 1e-9


def test_ablation_trains_resumes_and_does_not_depend_on_jobs(tmp_path):
    run = tmp_path / "run"
    train(_run_cfg(), run, progress=False)
    ab = AblationConfig(
        seeds=(0, 1), controls=("no-information", "capacity"), capacity_scales=(0.25,),
        second_text="builtin:bbe", second_batches=2,
    )  # fmt: skip
    lines: list[str] = []
    one = run_ablation(run, tmp_path / "one", ab, progress=False, echo=lines.append)
    assert one.arm("engram").runs[0] == str(run)  # the given run is reused for its seed
    assert len([ln for ln in lines if ln.startswith("[")]) == 6
    report = json.loads((tmp_path / "one" / "ablation.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["engram", "no-information", "capacity-x0.25"]
    assert all(len(a["val"]["losses"]) == 2 and len(a["second"]["losses"]) == 2
               for a in report["arms"])  # fmt: skip
    assert report["comparisons"]["no-information"]["val"]["seeds"] == [0, 1]
    assert any("memory content" in f for f in report["findings"])
    assert (tmp_path / "one" / "ablation.png").stat().st_size > 10_000
    # run again: everything is re-reported from the run directories, nothing retrained
    again = run_ablation(run, tmp_path / "one", ab, progress=False, echo=lambda _: None)
    assert again.to_dict()["arms"] == report["arms"]
    # two jobs side by side (one thread each): the same numbers, bit for bit
    two = run_ablation(run, tmp_path / "two", replace_jobs(ab, 2), progress=False,
                       echo=lambda _: None)  # fmt: skip
    for a, b in zip(one.arms, two.arms, strict=True):
        assert a.val == b.val and a.second == b.second


def replace_jobs(ab: AblationConfig, jobs: int) -> AblationConfig:
    from dataclasses import replace

    return replace(ab, jobs=jobs)


def test_cli_ablate_reports_and_refuses(tmp_path, capsys):
    run = tmp_path / "run"
    train(_run_cfg(), run, progress=False)
    code = main([
        "ablate", "--ckpt", str(run), "--out", str(tmp_path / "ab"), "--seeds", "0",
        "--controls", "experts", "--second-text", "none", "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "experts" in out and "one seed: no spread" in out
    assert main(["ablate", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    code = main(["ablate", "--ckpt", str(run), "--controls", "magic"])
    assert code == 2 and "unknown --controls" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [1 / 64, 1 / 16, 1 / 4, 4.0])
def test_capacity_ladder_scales_the_real_rows(scale):
    from dataclasses import replace

    from engram.presets import demo_engram, scaled_table

    cfg = demo_engram()
    full = run_shape(cfg)[1]
    rows = run_shape(replace(cfg, engram=scaled_table(cfg.engram, scale)))[1]
    if scale < 1:
        assert rows <= scale * full and rows > 0.9 * scale * full  # "16x smaller" is 16x smaller
    else:
        assert scale * full <= rows < 1.1 * scale * full
