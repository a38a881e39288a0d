"""`engram sweep`: the allocation sweep (loss against rho) and the table-size sweep.

Two experiments from the paper (SPEC section 5), on the built-in corpus or the user's:

- **rho sweep**: the same total-parameter and active-FLOP budget at several rho (the fraction of
  the sparse budget kept in routed experts). rho = 1 is the MoE baseline itself; every other
  point is `plan_for(baseline, rho)`, so all points have the same total parameters and the
  same active FLOPs within the planner's tolerance. The paper finds a U-shape with its minimum
  near rho = 0.75-0.8.
- **table-size sweep**: a FIXED backbone (the rho = `table_rho` model, its experts unchanged)
  with tables scaled by several factors of the planned size, so only the number of table
  slots changes: validation loss against log(slots). Here total parameters grow with the
  table; active FLOPs do not.

Design choices:
- Each point is an ordinary run directory trained by `engram.run.train`, so a sweep resumes
  where it stopped (finished runs are re-reported from their metrics, a half-trained one
  continues from its last checkpoint; `ckpt_every` is set so an interruption loses at most a
  quarter of a run) and any point can be inspected with the other commands.
- Points with identical configs are trained once (the table sweep's x1 point is the rho sweep's
  point at `table_rho`); run names are derived from the point, not counted, so adding a rho to
  a finished sweep trains only the new one.
- Data is tokenized once into the shared cache and every run reads the same tokens and
  validation split: the points are a paired comparison, as in the demo. Several seeds give the
  spread that tells a real effect from seed noise; the plots show each seed and the mean.
- Runs go through `engram.runner` (`jobs` side by side in worker processes), and each point is
  also evaluated on `second_text`, a text none of them trains on, when one is given.
- `sweep.json` and the plots are rewritten after every point finished in this call (and once at
  the end), so a long sweep can be watched and an interrupted one still leaves its partial
  figure.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engram.atomic import atomic_write_text
from engram.config import EngramConfig
from engram.presets import DEMO_RHO, plan_for, run_shape, scaled_table
from engram.run_config import RunConfig
from engram.runner import Job, JobResult, prepare_caches, run_jobs

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep; the baseline (an MoE run config) is passed separately."""

    rhos: tuple[float, ...] = (1.0, 0.875, 0.75, 0.5, 0.25)  # the paper's grid, 1.0 = pure MoE
    table_scales: tuple[float, ...] = (
        0.0625,
        0.25,
        1.0,
        4.0,
        16.0,
    )  # x the planned table; () = skip
    table_rho: float = DEMO_RHO  # the backbone of the table-size sweep (its experts stay fixed)
    seeds: tuple[int, ...] = (0,)  # train.seed per repetition: init and batch order
    tolerance: float = 0.01  # the planner's allowed total-param / FLOP gap
    second_text: str | None = None  # a source not trained on, every point evaluated on it
    second_batches: int | None = None  # cap on its evaluation batches (None: its whole val split)
    jobs: int = 1  # runs trained side by side, each in its own process (engram.runner)

    def __post_init__(self) -> None:
        if not self.rhos and not self.table_scales:
            raise ValueError("nothing to sweep: give at least one rho or one table scale")
        for r in (*self.rhos, self.table_rho):
            if not 0.0 <= r <= 1.0 or math.isnan(r):
                raise ValueError(f"rho must be in [0, 1], got {r}")
        if self.table_scales and self.table_rho == 1.0:
            raise ValueError("table_rho=1.0 has no table to scale; use a rho below 1")
        for s in self.table_scales:
            if not s > 0 or math.isinf(s):
                raise ValueError(f"table scales must be positive and finite, got {s}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-empty and >= 0, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")


@dataclass
class SweepPoint:
    """One trained configuration of the sweep."""

    kind: str  # "rho" or "table"
    rho: float  # requested fraction of the sparse budget in experts (1.0 = the MoE baseline)
    table_scale: float  # x the planned table at this rho (1.0 on the rho sweep)
    seed: int
    run: str  # run directory name under the sweep directory
    achieved_rho: float
    routed_experts: int
    table_slots: int  # rows over all Engram layers (0 for the MoE)
    total_params: int
    active_params: int
    flops_per_token: int
    val_loss: float | None = None
    step: int = 0
    second_loss: float | None = None  # on SweepConfig.second_text

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class SweepResult:
    out_dir: Path
    points: list[SweepPoint]
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "points": [p.to_dict() for p in self.points],
            "rho_curve": rho_curve(self.points),
            "table_curve": table_curve(self.points),
            "files": {k: str(v) for k, v in self.files.items()},
        }


def _config_key(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    d.pop("name")
    return json.dumps(d, sort_keys=True)


def sweep_points(
    baseline: RunConfig,
    sweep: SweepConfig,
    template: EngramConfig | None = None,
) -> list[tuple[SweepPoint, RunConfig]]:
    """Every point of the sweep with its run config, in training order (nothing is trained).

    Points whose configs are identical share one run (and one name).
    """
    from engram.model import flops_per_token
    from engram.plan import PlanError

    if baseline.base is not None or baseline.model is None:
        raise ValueError(
            f"the sweep plans experts against tables in engram's own MoE backbone; "
            f"{baseline.name!r} trains a Hugging Face base model ({baseline.base.path!r}), "
            "which has no experts to trade (sweep Engram's size there with --table-size runs)"
            if baseline.base is not None
            else f"{baseline.name!r} has no model section"
        )
    if baseline.model.ffn != "moe" or baseline.engram is not None:
        raise ValueError(
            f"the sweep's baseline must be an MoE run without Engram memory (model.ffn='moe', "
            f"no engram config), got {baseline.name!r} with ffn={baseline.model.ffn!r} and "
            f"{'an' if baseline.engram is not None else 'no'} engram config"
        )
    e0, k = baseline.model.n_routed_experts, baseline.model.moe_top_k
    names: dict[str, str] = {}
    out: list[tuple[SweepPoint, RunConfig]] = []

    def add(kind: str, rho: float, scale: float, seed: int, cfg: RunConfig) -> None:
        counts, slots = run_shape(cfg)
        every = cfg.train.ckpt_every or max(1, baseline.train.steps // 4)
        cfg = replace(cfg, train=replace(cfg.train, seed=seed, ckpt_every=every))
        key = _config_key(cfg)
        tag = f"rho{rho:g}" if kind == "rho" else f"rho{rho:g}-table{scale:g}x"
        name = names.setdefault(key, f"{tag}-s{seed}")
        point = SweepPoint(
            kind=kind, rho=rho, table_scale=scale, seed=seed, run=name,
            achieved_rho=(cfg.model.n_routed_experts - k) / (e0 - k) if e0 > k else 1.0,
            routed_experts=cfg.model.n_routed_experts, table_slots=slots,
            total_params=counts.total, active_params=counts.active,
            flops_per_token=flops_per_token(cfg.model, cfg.engram, baseline.data.seq_len),
        )  # fmt: skip
        out.append((point, replace(cfg, name=name)))

    def planned(rho: float) -> RunConfig:
        try:
            return plan_for(baseline, rho, template=template, tolerance=sweep.tolerance)[0]
        except PlanError as e:
            raise PlanError(f"rho={rho:g}: {e}") from e

    # Plan each configuration once; the seeds only change train.seed.
    configs = [("rho", rho, 1.0, baseline if rho == 1.0 else planned(rho)) for rho in sweep.rhos]
    if sweep.table_scales:
        fixed = planned(sweep.table_rho)
        assert fixed.engram is not None
        configs += [("table", sweep.table_rho, scale,
                     replace(fixed, engram=scaled_table(fixed.engram, scale)))
                    for scale in sweep.table_scales]  # fmt: skip
    for seed in sweep.seeds:
        for kind, rho, scale, cfg in configs:
            add(kind, rho, scale, seed, cfg)
    return out


def _curve(points: Sequence[SweepPoint], kind: str, x: str) -> list[dict[str, Any]]:
    """Per x value: every seed's loss, their mean and spread (finished points only)."""
    by_x: dict[float, list[SweepPoint]] = {}
    for p in points:
        if p.kind == kind and p.val_loss is not None:
            by_x.setdefault(getattr(p, x), []).append(p)
    curve = []
    for xv in sorted(by_x, reverse=kind == "rho"):
        ps = by_x[xv]
        losses = [float(p.val_loss) for p in ps if p.val_loss is not None]
        second = [float(p.second_loss) for p in ps if p.second_loss is not None]
        curve.append(
            {
                x: xv,
                "table_slots": ps[0].table_slots,
                "routed_experts": ps[0].routed_experts,
                "total_params": ps[0].total_params,
                "seeds": [p.seed for p in ps],
                "val_loss": losses,
                "mean": float(np.mean(losses)),
                "std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
                "second_loss": second,
                "second_mean": float(np.mean(second)) if second else None,
            }
        )
    return curve


def rho_curve(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """Validation loss against rho (descending rho, as the paper draws it)."""
    return _curve(points, "rho", "rho")


def table_curve(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """Validation loss against the table scale (and slots) at the fixed backbone."""
    return _curve(points, "table", "table_scale")


def plot_sweep(result: SweepResult) -> dict[str, Path]:
    """`sweep_rho.png` and `sweep_table.png` (each only when that sweep has finished points)."""
    from engram.plots import plot_sweep_curve

    files = {}
    rc, tc = rho_curve(result.points), table_curve(result.points)
    if rc:
        files["rho_png"] = plot_sweep_curve(
            [c["rho"] for c in rc], [c["val_loss"] for c in rc],
            result.out_dir / "sweep_rho.png",
            xlabel="rho: fraction of the sparse budget in routed experts (1 = MoE baseline)",
            title="Allocation sweep at equal total params and active FLOPs", invert_x=True,
        )  # fmt: skip
    moe = next((c for c in rc if c["rho"] == 1.0), None)
    if tc:
        files["table_png"] = plot_sweep_curve(
            [c["table_slots"] for c in tc], [c["val_loss"] for c in tc],
            result.out_dir / "sweep_table.png",
            xlabel="Engram table slots (all layers, log scale)", log_x=True,
            title="Table-size sweep at a fixed backbone",
            reference=None if moe is None else ("MoE baseline (rho = 1)", moe["mean"]),
        )  # fmt: skip
    return files


def _write(result: SweepResult) -> None:
    result.files.update(plot_sweep(result))
    path = result.out_dir / SWEEP_FILE
    result.files["json"] = path
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1) + "\n")


def run_sweep(
    out_dir: str | os.PathLike[str],
    baseline: RunConfig,
    sweep: SweepConfig | None = None,
    *,
    template: EngramConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """Train every point of the sweep into `out_dir/<run>` (resuming), then plot and summarise."""
    sweep = sweep or SweepConfig()
    out = Path(out_dir)
    plan = sweep_points(baseline, sweep, template)
    second = None if sweep.second_text is None else (
        sweep.second_text, "val", sweep.second_batches
    )  # fmt: skip
    prepare_caches(baseline, [] if second is None else [second[0]])
    result = SweepResult(out, [p for p, _ in plan])
    jobs: dict[str, Job] = {}
    for point, cfg in plan:
        jobs.setdefault(point.run, Job(cfg, out / point.run, second))
    names = list(jobs)

    def done(i: int, r: JobResult) -> None:
        for point in result.points:
            if point.run == names[i]:
                point.val_loss, point.step, point.second_loss = r.val_loss, r.step, r.second_loss
        p = next(p for p in result.points if p.run == names[i])
        echo(
            f"== [{i + 1}/{len(names)}] {p.run}: {p.routed_experts} experts, "
            f"{p.table_slots:,} table slots, {p.total_params:,} params: val {r.val_loss:.4f}"
            + ("" if r.second_loss is None else f", second text {r.second_loss:.4f}")
        )
        _write(result)

    run_jobs(list(jobs.values()), sweep.jobs, progress=progress, on_done=done)
    _write(result)
    return result


def format_sweep(result: SweepResult) -> str:
    """The two curves as text tables."""

    def table(head: str, curve: list[dict[str, Any]], first: Callable[[dict], str]) -> list[str]:
        second = any(c["second_mean"] is not None for c in curve)
        lines = [head + "   table slots   total params   val loss (per seed)  mean"
                 + ("   second text mean" if second else "")]  # fmt: skip
        for c in curve:
            per = ", ".join(f"{v:.4f}" for v in c["val_loss"])
            sec = "" if c["second_mean"] is None else f"   {c['second_mean']:.4f}"
            lines.append(
                f"{first(c)}  {c['table_slots']:>11,}  {c['total_params']:>13,}   "
                f"{per:<19}  {c['mean']:.4f}{sec}"
            )
        return lines

    rc, tc = rho_curve(result.points), table_curve(result.points)
    lines = []
    if rc:
        lines += table("rho    experts", rc, lambda c: f"{c['rho']:<6g} {c['routed_experts']:>7}")
    if tc:
        lines += ([""] if rc else []) + table("scale ", tc, lambda c: f"{c['table_scale']:<6g}")
    return "\n".join(lines)


def sweep_report(result: SweepResult, as_json: bool = False) -> str:
    """What `engram sweep` prints: the JSON (`as_json`), or the curves and the files written."""
    if as_json:
        return json.dumps(result.to_dict(), indent=1)
    return format_sweep(result) + "\nwrote " + ", ".join(str(v) for v in result.files.values())
