"""Iso-parameter, iso-FLOP allocation between routed experts and Engram tables (SPEC section 5).

Given a pure-MoE baseline, its sparse budget is ``P_sparse = P_total - P_active``: the routed
expert parameters a token does not use, ``(E - k) * 3 * D * d_expert`` per MoE layer. The Engram
model keeps a fraction ``rho`` of that budget in routed experts and moves ``1 - rho`` into
Engram tables:

    routed experts   E' = k + round(rho * (E - k))          (top-k unchanged: same active FLOPs)
    table values     P_total(baseline) - P_total(Engram model without its tables)

so the Engram model's total parameters equal the baseline's; its per-sub-table sizes are then
chosen (they must be distinct primes, see hashing) so the total lands within one row per
sub-table of the target. Active parameters and FLOPs differ only by the Engram layers' dense
projections (keys, value, conv), a small fraction of a token's work; the plan reports the gap and
refuses a configuration where it exceeds the tolerance (default 1%).

Design choices:
- Pure arithmetic on configs via `engram.model.count_params` / `flops_per_token` (exact, proven
  equal to a built model's counts in the model tests): planning a 100B-row table allocates nothing.
- The one integer knob is the expert count; the achieved rho (what the experts really hold) is
  reported next to the requested one, since E' is rounded.
- Memory is reported next to parameters: a table of R rows x dh values in float32 holds
  4*R*dh bytes, and training it with (sparse) Adam keeps two more tables' worth, the first and
  second moments (`optimizer_bytes`), wherever the table lives (RAM or the mmap store's files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.model import ModelConfig, ParamCounts, count_params, flops_per_token

BYTES_PER_VALUE = 4  # tables and their Adam moments train in float32


def table_bytes(rows: int, dim: int, bytes_per_value: int = BYTES_PER_VALUE) -> int:
    """Bytes of a table of `rows` x `dim` values."""
    return int(rows) * int(dim) * int(bytes_per_value)


def optimizer_bytes(rows: int, dim: int, bytes_per_value: int = BYTES_PER_VALUE) -> int:
    """Bytes of Adam's state for such a table: two moments (exp_avg, exp_avg_sq) per value."""
    return 2 * table_bytes(rows, dim, bytes_per_value)


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class PlanError(ValueError):
    """A budget that cannot be split as asked (no sparse budget, tolerance exceeded, ...)."""


@dataclass(frozen=True)
class Plan:
    """The baseline, the Engram model that matches it, and how closely."""

    rho: float  # requested fraction of the sparse budget kept in routed experts
    achieved_rho: float  # what the rounded expert count actually keeps
    sparse_budget: int  # P_total - P_active of the baseline
    baseline: ModelConfig
    model: ModelConfig  # the Engram model's backbone (fewer routed experts)
    engram: EngramConfig  # with engram_vocab_size set so the tables fill the budget
    table_rows: dict[int, int]  # rows per Engram layer (sum of its prime sub-table sizes)
    baseline_counts: ParamCounts
    counts: ParamCounts
    baseline_flops: int  # forward FLOPs per token
    flops: int
    seq_len: int

    @property
    def table_bytes(self) -> dict[int, int]:
        """Bytes of each Engram layer's table (float32)."""
        return {lid: table_bytes(r, self.engram.head_dim) for lid, r in self.table_rows.items()}

    @property
    def optimizer_bytes(self) -> dict[int, int]:
        """Bytes of each table's Adam moments (two more tables' worth)."""
        return {lid: optimizer_bytes(r, self.engram.head_dim) for lid, r in self.table_rows.items()}

    @property
    def param_gap(self) -> float:
        """Relative difference of total parameters, Engram vs baseline."""
        return self.counts.total / self.baseline_counts.total - 1.0

    @property
    def active_gap(self) -> float:
        return self.counts.active / self.baseline_counts.active - 1.0

    @property
    def flops_gap(self) -> float:
        return self.flops / self.baseline_flops - 1.0

    def to_dict(self) -> dict[str, Any]:
        def counts(c: ParamCounts) -> dict[str, int]:
            return {k: int(v) for k, v in vars(c).items()}

        return {
            "rho": self.rho,
            "achieved_rho": self.achieved_rho,
            "sparse_budget": self.sparse_budget,
            "seq_len": self.seq_len,
            "baseline": {
                "model": self.baseline.to_dict(),
                "params": counts(self.baseline_counts),
                "flops_per_token": self.baseline_flops,
            },
            "engram": {
                "model": self.model.to_dict(),
                "engram": self.engram.to_dict(),
                "table_rows": {str(k): v for k, v in self.table_rows.items()},
                "table_bytes": {str(k): v for k, v in self.table_bytes.items()},
                "optimizer_bytes": {str(k): v for k, v in self.optimizer_bytes.items()},
                "total_table_bytes": sum(self.table_bytes.values()),
                "total_optimizer_bytes": sum(self.optimizer_bytes.values()),
                "params": counts(self.counts),
                "flops_per_token": self.flops,
            },
            "gaps": {
                "total_params": self.param_gap,
                "active_params": self.active_gap,
                "flops_per_token": self.flops_gap,
            },
        }


def table_rows(engram: EngramConfig, compressed_vocab_size: int, pad_id: int) -> dict[int, int]:
    """Rows of each Engram layer's flat table (its prime sub-table sizes summed)."""
    hasher = NgramHasher.from_config(engram, compressed_vocab_size, pad_id)
    return {lid: hasher.total_rows(lid) for lid in engram.layer_ids}


def plan_allocation(
    baseline: ModelConfig,
    engram: EngramConfig,
    rho: float,
    *,
    compressed_vocab_size: int,
    pad_id: int,
    seq_len: int,
    tolerance: float = 0.01,
) -> Plan:
    """Split the baseline's sparse budget: `rho` to routed experts, the rest to Engram tables.

    `engram` gives the memory's shape (orders, heads, head dim, layers, seed); its
    `engram_vocab_size` is replaced. `compressed_vocab_size` and `pad_id` (compressed) are the
    hasher's, since the table sizes are primes found by it.
    """
    if not 0.0 <= rho <= 1.0 or math.isnan(rho):
        raise PlanError(f"rho must be in [0, 1] (fraction of the sparse budget), got {rho}")
    if baseline.ffn != "moe" or baseline.n_dense_layers >= baseline.n_layers:
        raise PlanError(
            f"the baseline must be an MoE (ffn='moe' with MoE layers), got ffn={baseline.ffn!r}, "
            f"n_dense_layers={baseline.n_dense_layers} of n_layers={baseline.n_layers}"
        )
    base_counts = count_params(baseline, None, None)
    budget = base_counts.total - base_counts.active
    if budget <= 0:
        raise PlanError(
            f"the baseline has no sparse budget (n_routed_experts={baseline.n_routed_experts}, "
            f"moe_top_k={baseline.moe_top_k}): nothing to reallocate"
        )
    k, e0 = baseline.moe_top_k, baseline.n_routed_experts
    experts = k + round(rho * (e0 - k))
    model = replace(baseline, n_routed_experts=experts)

    # Table values that make totals equal: baseline total minus the Engram model without tables.
    one_row = {lid: 1 for lid in engram.layer_ids}
    without_tables = count_params(model, engram, one_row)
    non_table = without_tables.total - without_tables.table
    table_values = base_counts.total - non_table
    n_layers_e, n_sub = len(engram.layer_ids), engram.n_subtables
    min_rows = 2 * n_sub * n_layers_e
    if table_values < min_rows * engram.head_dim:
        raise PlanError(
            f"rho={rho} leaves {table_values} table values for {n_layers_e} Engram layer(s) of "
            f"{n_sub} sub-tables x {engram.head_dim} dims: too small (raise 1 - rho or the budget)"
        )
    target_rows = table_values // engram.head_dim  # over all layers
    # Sub-table sizes are the next unused primes above engram_vocab_size[order]; iterate the
    # target down by the observed overshoot (primes lie above their start) until it fits.
    per_sub = max(2, target_rows // (n_layers_e * n_sub))
    for _ in range(8):
        cand = replace(engram, engram_vocab_size=(per_sub,) * (engram.max_ngram_size - 1))
        rows = table_rows(cand, compressed_vocab_size, pad_id)
        over = sum(rows.values()) - target_rows
        if over <= 0 or per_sub <= 2:
            break
        per_sub = max(2, per_sub - math.ceil(over / (n_layers_e * n_sub)))
    engram_final = cand
    counts = count_params(model, engram_final, rows)
    flops_b = flops_per_token(baseline, None, seq_len)
    flops_e = flops_per_token(model, engram_final, seq_len)
    achieved = (experts - k) / (e0 - k) if e0 > k else 1.0
    plan = Plan(
        rho=rho,
        achieved_rho=achieved,
        sparse_budget=budget,
        baseline=baseline,
        model=model,
        engram=engram_final,
        table_rows=rows,
        baseline_counts=base_counts,
        counts=counts,
        baseline_flops=flops_b,
        flops=flops_e,
        seq_len=seq_len,
    )
    for what, gap in (("total parameters", plan.param_gap), ("active FLOPs", plan.flops_gap)):
        if abs(gap) > tolerance:
            raise PlanError(
                f"{what} differ by {gap:+.2%} (> {tolerance:.0%}) between the Engram model and "
                "the baseline; the Engram layers' projections are too large for this backbone: "
                "use fewer Engram layers or a smaller n_embed_per_ngram"
            )
    return plan


def _per_layer_bytes(per_layer: dict[int, int]) -> str:
    """'1.2 MiB' for one layer; '1.2 MiB + 1.2 MiB = 2.4 MiB' for several."""
    parts = [format_bytes(v) for v in per_layer.values()]
    total = format_bytes(sum(per_layer.values()))
    return total if len(parts) == 1 else " + ".join(parts) + f" = {total}"


def format_plan(plan: Plan) -> str:
    """The side-by-side table `engram plan` prints."""
    b, e = plan.baseline_counts, plan.counts
    rows = [
        ("routed experts (top-k)", f"{plan.baseline.n_routed_experts} ({plan.baseline.moe_top_k})",
         f"{plan.model.n_routed_experts} ({plan.model.moe_top_k})", ""),
        ("Engram layers (0-based)", "-", ",".join(map(str, plan.engram.layer_ids)), ""),
        ("table rows per layer", "-",
         ", ".join(f"{v:,}" for v in plan.table_rows.values()), ""),
        ("total params", f"{b.total:,}", f"{e.total:,}", f"{plan.param_gap:+.3%}"),
        ("active params", f"{b.active:,}", f"{e.active:,}", f"{plan.active_gap:+.3%}"),
        ("table params", f"{b.table:,}", f"{e.table:,}", ""),
        ("table memory (fp32)", "-", _per_layer_bytes(plan.table_bytes), ""),
        ("optimizer memory (Adam)", "-", _per_layer_bytes(plan.optimizer_bytes), ""),
        ("routed expert params", f"{b.routed_experts:,}", f"{e.routed_experts:,}", ""),
        (f"FLOPs/token (T={plan.seq_len})", f"{plan.baseline_flops:,}", f"{plan.flops:,}",
         f"{plan.flops_gap:+.3%}"),
    ]  # fmt: skip
    head = ("", "MoE baseline", f"Engram (rho={plan.rho:g})", "gap")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [
        f"sparse budget P_total - P_active = {plan.sparse_budget:,}; rho requested "
        f"{plan.rho:g}, achieved {plan.achieved_rho:.4f} (experts are whole)",
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(head, widths, strict=False))
        ),
    ]
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=False))
            )
        )
    return "\n".join(lines)
