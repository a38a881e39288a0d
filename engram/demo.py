"""`engram demo`: an MoE baseline, its iso-parameter Engram model and that model's
no-information control, trained and compared.

Design choices:
- Everything here is a call into the library (planner, `train`, gate reading, plots); the demo
  only chooses the configurations (`engram.presets`) and lays out the results, so a user can
  reproduce any row of its table with `engram train --preset ...`.
- The third model is the Engram model with every n-gram reading the same row of each sub-table
  (`engram.addressing="constant"`): the gate, keys, value and conv train as usual, the table
  carries no n-gram identity. Engram vs MoE then splits into the table's content (Engram vs the
  control) and the pathway without content (the control vs MoE), the question a reader of any
  Engram result should ask first.
- All models see the same tokens in the same order (batches are a pure function of seed and
  step) and are validated on the same held-out chapters, so their losses are a paired
  comparison; each is also evaluated on a second text it never trained on (by default the same
  chapters in another translation). The runs train side by side in worker processes, one
  PyTorch thread each (`engram.runner`), so the numbers do not depend on how many ran at once.
- The run directory is resumable: running the demo again into the same directory continues (or,
  when finished, just re-reports) each model from its checkpoint instead of starting over.
- The summary table comes from `train`'s result, which reports a finished run from its
  `metrics.jsonl`, so it gives the same numbers whether the runs were trained now or earlier.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engram.analysis.gate_report import GATE_SENTENCE, gate_rows, plot_gate_panels
from engram.analysis.gates import GateReading, gate_values
from engram.atomic import atomic_write_text
from engram.data import prepare_data
from engram.data.tokenize import data_tokenizer
from engram.plan import Plan, format_plan
from engram.plots import plot_loss_curves
from engram.presets import DEMO_RHO, demo_moe, plan_for, quick_moe, run_shape
from engram.run_config import RunConfig
from engram.runner import Job, JobResult, prepare_caches, run_jobs
from engram.tokenizer import separator_id
from engram.train import METRICS_FILE, load_trained, read_metrics

# A text none of the demo's models trains on: the held-out chapters in Basic English.
SECOND_TEXT = "builtin:bbe"


@dataclass(frozen=True)
class RunSummary:
    """One trained model's row of the comparison table."""

    name: str
    out_dir: Path
    total_params: int
    active_params: int
    table_params: int
    routed_experts: int
    steps: int
    tokens: int
    tokens_per_s: float
    step_s: float
    val_loss: float
    second_loss: float | None = None  # on a text not trained on (see engram.heldout)

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["out_dir"] = str(self.out_dir)
        d["val_ppl"] = self.val_ppl
        return d


SAMPLE_PROMPT = "And God said unto Moses,"


@dataclass(frozen=True)
class DemoSample:
    """A greedy continuation of `SAMPLE_PROMPT` by the Engram model, tables in RAM and on disk."""

    prompt: str
    text: str
    ram_tokens_per_s: float
    disk_tokens_per_s: float
    same_tokens: bool  # the disk tier must give the RAM model's tokens

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class DemoResult:
    plan: Plan
    baseline: RunSummary
    engram: RunSummary
    no_information: RunSummary
    gates: GateReading
    loss_png: Path
    gate_png: Path
    summary_json: Path
    sample: DemoSample


def sample_both_tiers(run_dir: Path, new_tokens: int = 32) -> DemoSample:
    """Generate from a run with its tables in RAM, then from table files (mmap + cache)."""
    from engram.generate import generate
    from engram.serving import TierConfig, load_served

    out = {}
    for store in ("ram", "mmap"):
        tier = TierConfig(store=store, cache_rows=20_000 if store == "mmap" else 0)
        with load_served(run_dir, tier) as served:
            parts = served.parts
            ids = parts.tokenizer.encode(SAMPLE_PROMPT).ids
            res = generate(
                parts.model, [ids], indexer=parts.indexer, max_new_tokens=new_tokens,
                temperature=0, eos_id=parts.eot_id,
            )  # fmt: skip
            out[store] = (res, parts.tokenizer.decode(res.tokens[0]))
    (ram, text), (disk, _) = out["ram"], out["mmap"]
    return DemoSample(
        SAMPLE_PROMPT, text, ram.tokens_per_s, disk.tokens_per_s, ram.tokens == disk.tokens
    )


def demo_configs(quick: bool = False) -> tuple[RunConfig, RunConfig, Plan]:
    """The MoE baseline, its Engram counterpart (rho = 0.75) and the plan relating them."""
    base = quick_moe() if quick else demo_moe()
    engram_cfg, plan = plan_for(base, DEMO_RHO, name="engram")
    return base, engram_cfg, plan


def no_information_control(engram_cfg: RunConfig) -> RunConfig:
    """The Engram model with every n-gram reading row 0 of each sub-table (see engram.ablate)."""
    assert engram_cfg.engram is not None
    return replace(
        engram_cfg,
        name="no-information",
        engram=replace(engram_cfg.engram, addressing="constant"),
    )


def summarize(cfg: RunConfig, result: JobResult) -> RunSummary:
    """The table row of a finished run."""
    if result.val_loss is None:
        raise ValueError(f"run {result.job.out_dir} has no validation loss yet")
    counts, _ = run_shape(cfg)
    tokens_per_step = cfg.train.grad_accum * cfg.data.batch_size * cfg.data.seq_len
    return RunSummary(
        name=cfg.name,
        out_dir=result.job.out_dir,
        total_params=counts.total,
        active_params=counts.active,
        table_params=counts.table,
        routed_experts=cfg.model.n_routed_experts,
        steps=cfg.train.steps,
        tokens=cfg.train.steps * tokens_per_step,
        tokens_per_s=tokens_per_step / result.step_time_s,
        step_s=result.step_time_s,
        val_loss=result.val_loss,
        second_loss=result.second_loss,
    )


def format_summary(runs: Sequence[RunSummary], second_text: str | None = None) -> str:
    """Side-by-side table of the runs (baseline first)."""
    rows = [
        ("total params", [f"{r.total_params:,}" for r in runs]),
        ("active params / token", [f"{r.active_params:,}" for r in runs]),
        ("Engram table params", [f"{r.table_params:,}" for r in runs]),
        ("routed experts", [f"{r.routed_experts}" for r in runs]),
        ("training tokens", [f"{r.tokens:,}" for r in runs]),
        ("tokens/s (train)", [f"{r.tokens_per_s:,.0f}" for r in runs]),
        ("step time (median)", [f"{r.step_s * 1000:.0f} ms" for r in runs]),
        ("validation loss", [f"{r.val_loss:.4f}" for r in runs]),
        ("validation perplexity", [f"{r.val_ppl:.1f}" for r in runs]),
    ]
    if second_text is not None and all(r.second_loss is not None for r in runs):
        rows.append((f"loss on {second_text}", [f"{r.second_loss:.4f}" for r in runs]))
    head = ("", [r.name for r in runs])
    table = [head, *rows]
    w0 = max(len(label) for label, _ in table)
    widths = [max(len(cells[i]) for _, cells in table) for i in range(len(runs))]
    return "\n".join(
        f"{label:<{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        for label, cells in table
    )


PHASES = (("wait_s", "data wait"), ("fwd_s", "forward"), ("bwd_s", "backward"),
          ("opt_s", "optimizer"))  # fmt: skip


def step_breakdown(run: RunSummary) -> dict[str, float] | None:
    """Median seconds per step phase of a run, from its metrics.jsonl (`engram.train` records
    `wait_s`, `fwd_s`, `bwd_s`, `opt_s`), and `other`, the median of what each step spent
    outside them (learning-rate setting, loss read-out); None for a run recorded before the
    phases were. Medians: the phases need not add up to the median step exactly."""
    records = [r for r in read_metrics(run.out_dir / METRICS_FILE) if "step_s" in r]
    records = records[1:] or records  # the first step pays one-off allocations, as step_s
    if not records or any(key not in r for r in records for key, _ in PHASES):
        return None
    out = {key: statistics.median(r[key] for r in records) for key, _ in PHASES}
    out["other"] = statistics.median(r["step_s"] - sum(r[k] for k, _ in PHASES) for r in records)
    return out


def format_breakdown(runs: Sequence[RunSummary]) -> list[str]:
    """Median step phases (ms) per run and the Engram model's difference to the baseline."""
    parts = [step_breakdown(r) for r in runs]
    if any(p is None for p in parts):
        return []
    names = [r.name for r in runs]
    head = ["phase (median ms)", *names, f"{names[1]} - {names[0]}"]
    rows = [head]
    for key, label in (*PHASES, ("other", "other")):
        vals = [p[key] * 1000 for p in parts]  # type: ignore[index]
        rows.append([label, *(f"{v:.1f}" for v in vals), f"{vals[1] - vals[0]:+.1f}"])
    steps = [r.step_s * 1000 for r in runs]
    rows.append(["step", *(f"{v:.1f}" for v in steps), f"{steps[1] - steps[0]:+.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return [
        f"{row[0]:<{widths[0]}}  "
        + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]


def gain_sentences(base: RunSummary, eng: RunSummary, ctl: RunSummary) -> list[str]:
    """How much of the Engram model's difference to the MoE comes from the table's content."""
    lines = []
    for attr, where in (("val_loss", "validation"), ("second_loss", "second text")):
        b, e, c = getattr(base, attr), getattr(eng, attr), getattr(ctl, attr)
        if b is None or e is None or c is None:
            continue
        total, content, pathway = e - b, e - c, c - b
        lines.append(
            f"{where}: Engram vs MoE {total:+.4f} nats/token = memory content (Engram vs "
            f"no-information control) {content:+.4f} + pathway without content (control vs "
            f"MoE) {pathway:+.4f}"
        )
    return lines


def run_demo(
    out_dir: str | os.PathLike[str] = "engram-demo",
    *,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    configs: tuple[RunConfig, RunConfig, Plan] | None = None,
    jobs: int = 3,
    second_text: str | None = SECOND_TEXT,
) -> DemoResult:
    """Plan, train the MoE, the Engram model and its no-information control, compare them, and
    draw the loss curves and a gate heatmap.

    `configs` replaces the preset pair (baseline, Engram model, plan), e.g. with smaller models;
    `jobs` runs train side by side in worker processes; `second_text` (a source the models do
    not train on; None skips it) is evaluated for every model.
    """
    out = Path(out_dir)
    base_cfg, engram_cfg, plan = configs if configs is not None else demo_configs(quick)
    control_cfg = no_information_control(engram_cfg)
    echo(f"== plan: the Engram model keeps rho={plan.rho:g} of the MoE's sparse budget in experts")
    echo(format_plan(plan))
    echo("")
    prepare_caches(base_cfg, [] if second_text is None else [second_text])
    tokenizer = data_tokenizer(base_cfg.data)
    data = prepare_data(base_cfg.data, tokenizer, separator_id(tokenizer))
    echo(
        f"== data: {base_cfg.data.source} ({base_cfg.data.tokenizer} tokenizer, "
        f"{tokenizer.get_vocab_size(with_added_tokens=True):,} ids), {data.n_train_docs:,} "
        f"training / {data.n_val_docs:,} validation documents ({data.n_train_tokens:,} / "
        f"{data.n_val_tokens:,} tokens); second text: {second_text or 'none'}"
    )
    cfgs = [base_cfg, engram_cfg, control_cfg]
    # The second text gets as many batches as the final validation (None: all of them).
    second = None if second_text is None else (
        second_text, "val", base_cfg.train.final_eval_batches
    )  # fmt: skip
    run_list = [Job(cfg, out / cfg.name, second) for cfg in cfgs]
    echo(
        f"== training {', '.join(c.name for c in cfgs)} ({jobs} at a time) -> {out}/"
        "<name> (resumable)"
    )
    results = run_jobs(run_list, jobs, progress=progress)
    base, eng, ctl = (summarize(c, r) for c, r in zip(cfgs, results, strict=True))

    echo("")
    echo(format_summary([base, eng, ctl], second_text))
    speed = eng.step_s / base.step_s - 1.0
    for line in gain_sentences(base, eng, ctl):
        echo(line)
    echo(
        f"(one seed; step time Engram vs MoE {speed:+.1%}; same total params, active params "
        f"within {abs(plan.active_gap):.2%}; seeds and every control: `engram ablate`)"
    )
    breakdown = format_breakdown([base, eng, ctl])
    if breakdown:
        echo("where the step time goes (medians over each run's metrics.jsonl; "
             "benchmarks/bench_train.py breakdown splits the Engram layer further):")  # fmt: skip
        for line in breakdown:
            echo("  " + line)

    loss_png = plot_loss_curves(
        {s.name: read_metrics(s.out_dir / METRICS_FILE) for s in (base, eng, ctl)},
        out / "loss_curves.png",
        title=f"MoE vs Engram (rho={plan.rho:g}) vs its no-information control",
    )
    parts, _ = load_trained(eng.out_dir)
    assert parts.indexer is not None
    reading = gate_values(parts.model, parts.indexer, GATE_SENTENCE)
    gate_png = plot_gate_panels(
        reading.tokens,
        gate_rows(reading),
        out / "gate_heatmap.png",
        title="Engram gate per token (0-based layer ids)",
    )
    sample = sample_both_tiers(eng.out_dir)
    echo(f"== the Engram model continues (greedy): {sample.prompt}{sample.text}")
    echo(
        "   and with its tables read from table files on disk (mmap + hot-row cache): "
        f"{'the same tokens' if sample.same_tokens else 'DIFFERENT tokens'} (engram generate --help)"
    )
    summary_json = out / "summary.json"
    atomic_write_text(
        summary_json,
        json.dumps(
            {
                "plan": plan.to_dict(),
                "baseline": base.to_dict(),
                "engram": eng.to_dict(),
                "no_information": ctl.to_dict(),
                "second_text": second_text,
                "gain": gain_sentences(base, eng, ctl),
                "step_breakdown_s": {r.name: step_breakdown(r) for r in (base, eng, ctl)},
                "gates": reading.to_dict(),
                "sample": sample.to_dict(),
            },
            indent=1,
        )
        + "\n",
    )
    echo(f"wrote {loss_png}, {gate_png} and {summary_json}")
    return DemoResult(plan, base, eng, ctl, reading, loss_png, gate_png, summary_json, sample)
