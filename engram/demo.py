"""`engram demo`: an MoE baseline and its iso-parameter Engram model, trained and compared.

Design choices:
- Everything here is a call into the library (planner, `train`, gate reading, plots); the demo
  only chooses the two configurations (`engram.presets`) and lays out the results, so a user can
  reproduce any row of its table with `engram train --preset ...`.
- Both models see the same tokens in the same order (batches are a pure function of seed and
  step) and are validated on the same held-out chapters, so their losses are a paired comparison.
- The run directory is resumable: running the demo again into the same directory continues (or,
  when finished, just re-reports) each model from its checkpoint instead of starting over.
- The summary table comes from `train`'s result, which reports a finished run from its
  `metrics.jsonl`, so it gives the same numbers whether the runs were trained now or earlier.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.analysis.gate_report import gate_rows, plot_gate_panels
from engram.analysis.gates import GateReading, gate_values
from engram.atomic import atomic_write_text
from engram.data import prepare_data
from engram.data_tokenizer import data_tokenizer
from engram.plan import Plan, format_plan
from engram.plots import plot_loss_curves
from engram.presets import DEMO_RHO, demo_moe, plan_for, quick_moe
from engram.run_config import RunConfig
from engram.tokenizer import separator_id
from engram.train import METRICS_FILE, TrainResult, load_trained, read_metrics, train

# Multi-token names and fixed phrases from the corpus' world (not a training sentence verbatim).
GATE_SENTENCE = (
    "And Nebuchadnezzar the king of Babylon went up against Jerusalem, and Melchizedek "
    "king of Salem brought forth bread and wine unto the children of Israel."
)


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


def summarize(cfg: RunConfig, result: TrainResult) -> RunSummary:
    """The table row of a finished run."""
    if result.val_loss is None:
        raise ValueError(f"run {result.out_dir} has no validation loss yet")
    tokens_per_step = cfg.train.grad_accum * cfg.data.batch_size * cfg.data.seq_len
    return RunSummary(
        name=cfg.name,
        out_dir=result.out_dir,
        total_params=result.counts.total,
        active_params=result.counts.active,
        table_params=result.counts.table,
        routed_experts=cfg.model.n_routed_experts,
        steps=result.step,
        tokens=result.step * tokens_per_step,
        tokens_per_s=result.tokens_per_s,
        step_s=result.step_time_s,
        val_loss=result.val_loss,
    )


def format_summary(a: RunSummary, b: RunSummary) -> str:
    """Side-by-side table of two runs (baseline first)."""
    rows = [
        ("total params", f"{a.total_params:,}", f"{b.total_params:,}"),
        ("active params / token", f"{a.active_params:,}", f"{b.active_params:,}"),
        ("Engram table params", f"{a.table_params:,}", f"{b.table_params:,}"),
        ("routed experts", f"{a.routed_experts}", f"{b.routed_experts}"),
        ("training tokens", f"{a.tokens:,}", f"{b.tokens:,}"),
        ("tokens/s (train)", f"{a.tokens_per_s:,.0f}", f"{b.tokens_per_s:,.0f}"),
        ("step time (median)", f"{a.step_s * 1000:.0f} ms", f"{b.step_s * 1000:.0f} ms"),
        ("validation loss", f"{a.val_loss:.4f}", f"{b.val_loss:.4f}"),
        ("validation perplexity", f"{a.val_ppl:.1f}", f"{b.val_ppl:.1f}"),
    ]
    head = ("", a.name, b.name)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]

    def line(r: tuple[str, str, str]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}"

    return "\n".join([line(head), *(line(r) for r in rows)])


def run_demo(
    out_dir: str | os.PathLike[str] = "engram-demo",
    *,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    configs: tuple[RunConfig, RunConfig, Plan] | None = None,
) -> DemoResult:
    """Plan, train both models, compare, and draw the loss curves and a gate heatmap.

    `configs` replaces the preset pair (baseline, Engram model, plan), e.g. with smaller models.
    """
    out = Path(out_dir)
    base_cfg, engram_cfg, plan = configs if configs is not None else demo_configs(quick)
    echo(f"== plan: the Engram model keeps rho={DEMO_RHO} of the MoE's sparse budget in experts")
    echo(format_plan(plan))
    echo("")
    tokenizer = data_tokenizer(base_cfg.data)
    data = prepare_data(base_cfg.data, tokenizer, separator_id(tokenizer))
    echo(
        f"== data: {base_cfg.data.source}, {data.n_train_docs:,} training / {data.n_val_docs:,} "
        f"validation documents ({data.n_train_tokens:,} / {data.n_val_tokens:,} tokens)"
    )
    summaries = []
    for cfg in (base_cfg, engram_cfg):
        run_dir = out / cfg.name
        echo(f"== training {cfg.name} -> {run_dir}")
        result = train(cfg, run_dir, progress=progress, data=data)
        summaries.append(summarize(cfg, result))
    base, eng = summaries

    echo("")
    echo(format_summary(base, eng))
    delta = eng.val_loss - base.val_loss
    speed = eng.step_s / base.step_s - 1.0
    echo(
        f"Engram vs MoE: validation loss {delta:+.4f} nats/token, step time {speed:+.1%} "
        f"(same total params, same active params within {abs(plan.active_gap):.2%})"
    )

    loss_png = plot_loss_curves(
        {s.name: read_metrics(s.out_dir / METRICS_FILE) for s in summaries},
        out / "loss_curves.png",
        title=f"MoE vs Engram (rho={DEMO_RHO}) on {base_cfg.data.source}",
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
                "gates": reading.to_dict(),
                "sample": sample.to_dict(),
            },
            indent=1,
        )
        + "\n",
    )
    echo(f"wrote {loss_png}, {gate_png} and {summary_json}")
    return DemoResult(plan, base, eng, reading, loss_png, gate_png, summary_json, sample)
