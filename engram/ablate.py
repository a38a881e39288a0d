"""`engram ablate`: the controls that tell what an Engram table stores from everything else.

An Engram model can beat its baseline for reasons that have nothing to do with the n-grams in
its table: the extra gate, keys, value and conv, or simply more parameters. For one trained
Engram run, this trains the same model with one thing changed at a time ("arms"), all on the
same data, token order, schedule and seeds:

- ``engram``: the run itself, at every seed.
- ``no-information``: every n-gram reads row 0 of each sub-table (`addressing="constant"`):
  the pathway trains, the memory carries no n-gram identity.
- ``address``: the full table, addressed by a fixed random function of token position
  (`addressing="position"`): as many parameters and reads, no n-gram identity.
- ``capacity xS``: the same heads with every sub-table scaled by S (the capacity ladder).
- ``frozen``: the table stays at its random init (`optim.table_lr_mult=0`).
- ``experts``: the backbone with the Engram model's routed experts and no memory.
- ``baseline``: optionally, the iso-parameter MoE the run was planned from.

Every arm is reported in-domain (the run's validation split) and on a second text (by default
the same held-out chapters in another translation), as mean and sample standard deviation over
seeds, with the paired difference to the Engram run (same seed, same batches). A difference
counts as clear when it exceeds three times the larger of the two arms' seed standard
deviations; the report says so in words.

Design choices:
- Each (arm, seed) is an ordinary run directory (`<arm>-s<seed>`), trained by `engram.train`,
  so an interrupted ablation resumes, a finished one re-reports from its metrics, and any arm
  can be inspected with the other commands. The given run is reused for its own seed when its
  config is exactly that arm's.
- Runs are independent processes when ``jobs`` > 1. Every arm trains with ``threads`` PyTorch
  threads (default 1): CPU results are bit-reproducible for a fixed count, so the numbers do
  not depend on how many jobs ran side by side.
- The capacity ladder is the table-size sweep at a fixed backbone: scales above 1 give tables
  larger than planned (more total parameters, the same active FLOPs).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engram.atomic import atomic_write_text
from engram.heldout import SPLITS
from engram.presets import run_shape, scaled_table
from engram.run_config import ConfigError, RunConfig
from engram.runner import Job, JobResult, prepare_caches, run_jobs

ABLATION_FILE = "ablation.json"
CONTROLS = ("no-information", "address", "capacity", "frozen", "experts")
DEFAULT_SCALES = (1 / 64, 1 / 16, 1 / 4)
SECOND_TEXT = "builtin:bbe"
CLEAR_FACTOR = 3.0  # a difference is clear beyond this many seed standard deviations


@dataclass(frozen=True)
class AblationConfig:
    """What to train around an Engram run."""

    seeds: tuple[int, ...] = (0, 1, 2)  # train.seed of each repetition
    controls: tuple[str, ...] = CONTROLS  # which controls (see the module docstring)
    capacity_scales: tuple[float, ...] = DEFAULT_SCALES  # the ladder: x the run's sub-tables
    second_text: str | None = SECOND_TEXT  # text not trained on (a source); None skips it
    second_split: str = "val"  # "val": its held-out documents; "all": every document
    second_batches: int | None = None  # cap on its evaluation batches (None: all)
    threads: int = 1  # PyTorch threads per run (fixed, so results do not depend on jobs)
    jobs: int = 1  # runs trained side by side, each in its own process

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {list(self.seeds)}")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise ValueError(f"unknown controls {unknown}; expected some of {list(CONTROLS)}")
        for s in self.capacity_scales:
            if not (s > 0 and math.isfinite(s)) or s == 1.0:
                raise ValueError(
                    f"capacity scales must be positive, finite and not 1 (the run itself), got {s}"
                )
        if self.second_split not in SPLITS:
            raise ValueError(
                f"second_split must be one of {list(SPLITS)}, got {self.second_split!r}"
            )
        if self.threads < 1 or self.jobs < 1:
            raise ValueError(f"threads and jobs must be >= 1, got {self.threads}, {self.jobs}")


@dataclass(frozen=True)
class Arm:
    """One configuration of the ablation (its seed-0 config; seeds replace train.seed)."""

    name: str
    what: str  # one line for tables and plots
    cfg: RunConfig
    table_slots: int
    total_params: int
    active_params: int
    scale: float | None = None  # the capacity ladder's factor (1.0 for the Engram run)


@dataclass
class ArmResult:
    """An arm's losses per seed (None where not trained yet)."""

    arm: Arm
    runs: dict[int, str] = field(default_factory=dict)  # seed -> run directory
    val: dict[int, float] = field(default_factory=dict)
    second: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        a = self.arm
        return {
            "name": a.name, "what": a.what, "table_slots": a.table_slots,
            "total_params": a.total_params, "active_params": a.active_params, "scale": a.scale,
            "runs": {str(s): r for s, r in self.runs.items()},
            "val": _stats(self.val), "second": _stats(self.second),
        }  # fmt: skip


def _stats(losses: dict[int, float]) -> dict[str, Any]:
    v = [losses[s] for s in sorted(losses)]
    return {
        "seeds": sorted(losses),
        "losses": v,
        "mean": float(np.mean(v)) if v else None,
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
    }


def _seeded(cfg: RunConfig, seed: int, threads: int) -> RunConfig:
    return replace(cfg, train=replace(cfg.train, seed=seed, threads=threads))


def _same(a: RunConfig, b: RunConfig) -> bool:
    da, db = a.to_dict(), b.to_dict()
    da.pop("name")
    db.pop("name")
    return da == db


def build_arms(run_cfg: RunConfig, ab: AblationConfig, baseline: RunConfig | None) -> list[Arm]:
    """The arms of the ablation of `run_cfg` (an Engram run's config), in report order."""
    if run_cfg.engram is None:
        raise ConfigError(
            f"run {run_cfg.name!r} has no Engram memory; ablate an Engram run (its controls "
            "need a table), or compare baselines with `engram sweep`"
        )
    if run_cfg.base is not None:
        raise ConfigError(
            f"run {run_cfg.name!r} trains a Hugging Face base model ({run_cfg.base.path!r}); "
            "`engram ablate` builds its controls and baselines from engram's own backbone and "
            "does not support base-model runs"
        )
    if run_cfg.engram.addressing != "ngram":
        raise ConfigError(
            f"run {run_cfg.name!r} is itself a control (engram.addressing="
            f"{run_cfg.engram.addressing!r}); ablate the Engram run it controls"
        )
    e = run_cfg.engram
    specs: list[tuple[str, str, RunConfig, float | None]] = [
        ("engram", "the Engram run", run_cfg, 1.0)
    ]
    if "no-information" in ab.controls:
        specs.append(("no-information", "every n-gram reads row 0 of each sub-table",
                      replace(run_cfg, engram=replace(e, addressing="constant")), None))  # fmt: skip
    if "address" in ab.controls:
        specs.append(("address", "full table, rows chosen by token position, not n-gram",
                      replace(run_cfg, engram=replace(e, addressing="position")), None))  # fmt: skip
    if "capacity" in ab.controls:
        for s in sorted(ab.capacity_scales):
            specs.append((f"capacity-x{s:g}", f"same heads, sub-tables x{s:g}",
                          replace(run_cfg, engram=scaled_table(e, s)), s))  # fmt: skip
    if "frozen" in ab.controls:
        frozen = replace(run_cfg, optim=replace(run_cfg.optim, table_lr_mult=0.0))
        specs.append(("frozen", "table never trained (random init)", frozen, None))
    if "experts" in ab.controls:
        specs.append((
            "experts", f"{run_cfg.model.n_routed_experts} routed experts, no memory",
            replace(run_cfg, engram=None), None,
        ))  # fmt: skip
    if baseline is not None:
        if baseline.engram is not None:
            raise ConfigError("the baseline must be a run without Engram memory")
        specs.append(("baseline", f"iso-parameter baseline ({baseline.model.n_routed_experts} "
                      "experts, no memory)", baseline, None))  # fmt: skip
    arms = []
    for name, what, cfg, scale in specs:
        counts, slots = run_shape(cfg)
        arms.append(Arm(name, what, replace(cfg, name=name), slots, counts.total,
                        counts.active, scale))  # fmt: skip
    return arms


@dataclass
class AblationResult:
    out_dir: Path
    config: AblationConfig
    run: Path
    arms: list[ArmResult]
    findings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def arm(self, name: str) -> ArmResult | None:
        return next((a for a in self.arms if a.arm.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "run": str(self.run),
            "out_dir": str(self.out_dir),
            "seeds": list(c.seeds),
            "second_text": c.second_text,
            "second_split": c.second_split,
            "threads_per_run": c.threads,
            "clear_factor": CLEAR_FACTOR,
            "arms": [a.to_dict() for a in self.arms],
            "comparisons": comparisons(self),
            "capacity_fit": {k: capacity_fit(self, k) for k in ("val", "second")},
            "findings": self.findings,
            "files": {k: str(v) for k, v in self.files.items()},
        }


def paired(a: ArmResult, b: ArmResult, kind: str = "val") -> dict[str, Any] | None:
    """b - a per common seed (positive: a is lower), with the clear-difference verdict."""
    la, lb = getattr(a, kind), getattr(b, kind)
    seeds = sorted(set(la) & set(lb))
    if not seeds:
        return None
    d = [lb[s] - la[s] for s in seeds]
    sa, sb = _stats({s: la[s] for s in seeds}), _stats({s: lb[s] for s in seeds})
    spread = max(sa["std"] or 0.0, sb["std"] or 0.0) if len(seeds) > 1 else None
    gap = sb["mean"] - sa["mean"]
    return {
        "a": a.arm.name, "b": b.arm.name, "seeds": seeds, "diffs": d,
        "mean": float(np.mean(d)), "std": float(np.std(d, ddof=1)) if len(d) > 1 else None,
        "seed_std": spread,
        "clear": None if spread is None else bool(abs(gap) > CLEAR_FACTOR * spread),
    }  # fmt: skip


def comparisons(result: AblationResult) -> dict[str, dict[str, Any]]:
    """Every arm against the Engram run (b - engram), in-domain and on the second text."""
    eng = result.arm("engram")
    out: dict[str, dict[str, Any]] = {}
    if eng is None:
        return out
    for a in result.arms:
        if a is eng:
            continue
        out[a.arm.name] = {k: paired(eng, a, k) for k in ("val", "second")}
    return out


def capacity_fit(result: AblationResult, kind: str = "val") -> dict[str, Any] | None:
    """Least-squares slope of mean loss against log2(table slots) over the ladder and the run."""
    pts = [(a.arm.table_slots, _stats(getattr(a, kind))["mean"]) for a in result.arms
           if a.arm.scale is not None and getattr(a, kind)]  # fmt: skip
    if len(pts) < 2:
        return None
    x = np.log2([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    return {
        "slots": [p[0] for p in pts],
        "mean_loss": y.tolist(),
        "per_doubling": float(slope),
        "rms_residual": float(np.sqrt(np.mean(resid**2))),
    }


def _fmt_diff(c: dict[str, Any] | None) -> str:
    if c is None:
        return "not measured"
    sd = f" ± {c['std']:.3f}" if c["std"] is not None else ""
    n = len(c["seeds"])
    verdict = ""
    if c["clear"] is not None:
        lower = "Engram" if c["mean"] > 0 else c["b"]
        verdict = (
            f" (clear: {lower} is lower by more than 3 seed std)" if c["clear"]
            else f" (within noise: 3 seed std = {CLEAR_FACTOR * c['seed_std']:.3f})"
        )  # fmt: skip
    else:
        verdict = " (one seed: no spread to judge by)"
    return f"{c['mean']:+.3f}{sd} nats over {n} seed{'s' if n > 1 else ''}{verdict}"


def findings(result: AblationResult) -> list[str]:
    """What the controls show, in words (positive differences: the Engram run is lower)."""
    comp = comparisons(result)
    lines = []
    for kind, where in (("val", "in-domain"), ("second", "on the second text")):
        c = {k: v[kind] for k, v in comp.items() if v[kind] is not None}
        if not c:
            continue
        lines.append(f"{where.capitalize()} (control minus Engram; positive = the table helps):")
        if "no-information" in c:
            lines.append(f"- memory content (vs no-information): {_fmt_diff(c['no-information'])}")
        if "address" in c:
            lines.append(f"- n-gram addressing (vs address control): {_fmt_diff(c['address'])}")
        if "frozen" in c:
            lines.append(f"- training the rows (vs frozen table): {_fmt_diff(c['frozen'])}")
        for name, v in c.items():
            if name.startswith("capacity-"):
                lines.append(f"- table size (vs {name}): {_fmt_diff(v)}")
        if "experts" in c:
            lines.append(
                f"- the whole pathway (vs same experts, no memory): {_fmt_diff(c['experts'])}"
            )
        if "baseline" in c:
            lines.append(f"- vs the iso-parameter baseline: {_fmt_diff(c['baseline'])}")
        fit = capacity_fit(result, kind)
        if fit is not None:
            lines.append(
                f"- loss against table slots ({min(fit['slots']):,} to {max(fit['slots']):,}): "
                f"{fit['per_doubling']:+.4f} nats per doubling (rms residual "
                f"{fit['rms_residual']:.4f} around the log-linear fit)"
            )
        if "no-information" in c and "experts" in c:
            content, pathway = c["no-information"]["mean"], c["experts"]["mean"]
            if pathway > 0 and content > 0:
                lines.append(
                    f"- of the pathway's {pathway:.3f} nats over the same experts, "
                    f"{content:.3f} ({min(content / pathway, 1.0):.0%}) come from the table's "
                    "content and the rest from the pathway without it"
                )
            elif pathway > 0:
                lines.append(
                    f"- the pathway's {pathway:.3f} nats over the same experts come without "
                    "the table's content: the no-information control keeps all of it"
                )
    return lines


def plot_ablation(result: AblationResult, path: Path) -> Path:
    """Per-arm losses (seeds as dots, mean ± std) in-domain and on the second text, and the
    capacity ladder against table slots."""
    from engram.plots import plot_ablation_panels

    return plot_ablation_panels(result.to_dict(), path)


def _write(result: AblationResult) -> None:
    result.findings = findings(result)
    if any(a.val for a in result.arms):
        result.files["png"] = plot_ablation(result, result.out_dir / "ablation.png")
    result.files["json"] = result.out_dir / ABLATION_FILE
    atomic_write_text(result.files["json"], json.dumps(result.to_dict(), indent=1) + "\n")


def run_ablation(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    ab: AblationConfig | None = None,
    *,
    baseline: RunConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> AblationResult:
    """Train every arm of the ablation of the Engram run in `run_dir` at every seed (resuming)."""
    from engram.train import CONFIG_FILE

    ab = ab or AblationConfig()
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise ConfigError(f"{run} is not a run directory (no {CONFIG_FILE})")
    run_cfg = RunConfig.load(run / CONFIG_FILE)
    arms = build_arms(run_cfg, ab, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = AblationResult(out, ab, run, [ArmResult(a) for a in arms])
    second = None if ab.second_text is None else (
        ab.second_text, ab.second_split, ab.second_batches
    )  # fmt: skip
    jobs: list[Job] = []
    owners: list[tuple[ArmResult, int]] = []
    for seed in ab.seeds:
        for ar in result.arms:
            cfg = _seeded(ar.arm.cfg, seed, ab.threads)
            if _same(cfg, run_cfg):  # the given run is this arm at this seed: report it
                cfg, path = run_cfg, run
            else:
                cfg = replace(cfg, name=f"{ar.arm.name}-s{seed}")
                path = out / cfg.name
            ar.runs[seed] = str(path)
            jobs.append(Job(cfg, path, second))
            owners.append((ar, seed))
    prepare_caches(run_cfg, [] if second is None else [second[0]])
    echo(
        f"== ablation of {run}: {len(result.arms)} arms x {len(ab.seeds)} seeds = {len(jobs)} "
        f"runs, {ab.jobs} at a time, {ab.threads} thread(s) each"
    )

    def done(i: int, r: JobResult) -> None:
        ar, seed = owners[i]
        if r.val_loss is not None:
            ar.val[seed] = r.val_loss
        if r.second_loss is not None:
            ar.second[seed] = r.second_loss
        n = sum(len(a.val) for a in result.arms)
        sec_txt = "" if r.second_loss is None else f", second text {r.second_loss:.4f}"
        echo(
            f"[{n}/{len(jobs)}] {ar.arm.name} seed {seed}: val {r.val_loss:.4f}{sec_txt} "
            f"({r.seconds:.0f} s)"
        )
        _write(result)

    run_jobs(jobs, ab.jobs, progress=progress, on_done=done)
    _write(result)
    return result


def format_ablation(result: AblationResult) -> str:
    """The arms as a text table, then the findings."""
    has_second = any(a.second for a in result.arms)
    head = f"{'arm':<18} {'table slots':>11} {'params':>11}  {'val loss mean ± std':>20}"
    head += f"  {'- engram':>9}" + (f"  {'second text':>20}  {'- engram':>9}" if has_second else "")
    lines = [head]
    comp = comparisons(result)

    def cell(st: dict[str, Any]) -> str:
        if st["mean"] is None:
            return "-"
        sd = f" ± {st['std']:.4f}" if st["std"] is not None else ""
        return f"{st['mean']:.4f}{sd}"

    def diff(c: dict[str, Any] | None) -> str:
        return "" if c is None else f"{c['mean']:+.4f}"

    for a in result.arms:
        c = comp.get(a.arm.name, {})
        row = (
            f"{a.arm.name:<18} {a.arm.table_slots:>11,} {a.arm.total_params:>11,}  "
            f"{cell(_stats(a.val)):>20}  {diff(c.get('val')):>9}"
        )
        if has_second:
            row += f"  {cell(_stats(a.second)):>20}  {diff(c.get('second')):>9}"
        lines.append(row)
    return "\n".join([*lines, "", *result.findings])


def ablation_report(result: AblationResult, as_json: bool = False) -> str:
    """What `engram ablate` prints: the JSON (`as_json`), or the table, findings and files."""
    if as_json:
        return json.dumps(result.to_dict(), indent=1)
    return format_ablation(result) + "\nwrote " + ", ".join(str(v) for v in result.files.values())
