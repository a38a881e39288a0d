"""Named run configurations: the demo's MoE baseline and its iso-parameter Engram model.

Design choices:
- Presets are functions returning a `RunConfig`, listed in one read-only registry, so
  `engram train --preset NAME` and the Python API build exactly the same thing.
- An Engram preset is never written by hand: it is the allocation planner applied to its
  baseline (`engram.plan.plan_allocation`), so "same total parameters, same active FLOPs" holds
  by construction and stays true when the baseline changes.
- Sizes are chosen for 2 CPU cores: the GPT-2 output layer (50,257 x d) is most of a step's
  work at this scale, so the backbone is small and the sparse budget (experts vs tables) is
  where the models differ. The demo trains on the King James Version only: the five built-in
  translations are parallel texts, and a chapter held out in one translation would be
  near-duplicated by its siblings in the training split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType

from engram.compress import TokenizerCompressor
from engram.config import EngramConfig
from engram.data import DataConfig
from engram.data.tokenize import data_tokenizer
from engram.hashing import prime_table_sizes
from engram.model import ModelConfig, ParamCounts, count_params
from engram.optim import OptimConfig
from engram.plan import Plan, plan_allocation, table_rows
from engram.run_config import RunConfig, TrainConfig
from engram.tokenizer import EOT_ID, separator_id

# The fraction of the sparse budget kept in routed experts (the paper's optimum: 75-80%).
DEMO_RHO = 0.75


def engram_template(layer_ids: tuple[int, ...] = (1,), n_embed_per_ngram: int = 32) -> EngramConfig:
    """The memory's shape for the small presets (sizes are filled in by the planner).

    4 heads x 8 dims per order: memory width 64, so the key and value projections keep the
    Engram model's active FLOPs within 1% of its MoE even with a 4,096-id output layer.
    """
    return EngramConfig(
        engram_vocab_size=(10_007, 10_007),  # replaced by the planner
        max_ngram_size=3,  # orders 2 and 3, as the paper
        n_embed_per_ngram=n_embed_per_ngram,
        n_head_per_ngram=4,
        layer_ids=layer_ids,  # 0-based: the paper's "layer 2", after one attention layer
        pad_id=EOT_ID,
        seed=0,
    )


def plan_for(
    baseline: RunConfig,
    rho: float = DEMO_RHO,
    name: str | None = None,
    template: EngramConfig | None = None,
    tolerance: float = 0.01,
) -> tuple[RunConfig, Plan]:
    """The iso-parameter, iso-FLOP Engram version of an MoE baseline run, and its plan.

    `template` is the memory's shape (default `engram_template()`); its sizes are planned and
    its pad id becomes the end-of-document id of the baseline's tokenizer (`data.tokenizer`).
    """
    tokenizer = data_tokenizer(baseline.data)
    eot = separator_id(tokenizer)
    comp = TokenizerCompressor.from_tokenizer(tokenizer)
    template = template if template is not None else engram_template()
    plan = plan_allocation(
        baseline.model,
        replace(template, pad_id=eot),
        rho,
        compressed_vocab_size=comp.compressed_vocab_size,
        pad_id=comp.compress_id(eot),
        seq_len=baseline.data.seq_len,
        tolerance=tolerance,
    )
    cfg = replace(baseline, name=name or f"engram-rho{rho:g}", model=plan.model, engram=plan.engram)
    return cfg, plan


def _total_rows(engram: EngramConfig, targets: tuple[int, ...]) -> int:
    sizes = prime_table_sizes(
        targets, engram.max_ngram_size, engram.n_head_per_ngram, engram.layer_ids
    )
    return sum(p for per_order in sizes.values() for heads in per_order for p in heads)


def scaled_table(engram: EngramConfig, scale: float) -> EngramConfig:
    """The same heads with every order's sub-table size target scaled so that the table's
    actual rows (prime sizes) are at most `scale` x the original's for a shrink (scale < 1) and
    at least that for a growth: a "16x smaller" table really is 16x smaller."""
    full = _total_rows(engram, engram.engram_vocab_size)
    factor = scale
    for _ in range(10_000):
        targets = tuple(max(2, round(v * factor)) for v in engram.engram_vocab_size)
        rows = _total_rows(engram, targets)
        if (rows <= scale * full) if scale < 1 else (rows >= scale * full):
            return replace(engram, engram_vocab_size=targets)
        if scale < 1 and all(t == 2 for t in targets):
            raise ValueError(f"no table with these heads is {scale:g} x {full:,} rows or smaller")
        factor *= 0.999 if scale < 1 else 1.001
    raise ValueError(f"could not scale the table by {scale:g}")  # unreachable in practice


def run_shape(cfg: RunConfig) -> tuple[ParamCounts, int]:
    """Parameter counts of a run and its table slots over all Engram layers (0 without one)."""
    rows = None
    if cfg.engram is not None:
        tokenizer = data_tokenizer(cfg.data)
        comp = TokenizerCompressor.from_tokenizer(tokenizer)
        pad = comp.compress_id(cfg.engram.pad_id)
        rows = table_rows(cfg.engram, comp.compressed_vocab_size, pad)
    return count_params(cfg.model, cfg.engram, rows), sum((rows or {}).values())


# The demo's regime, chosen by measurement (docs/controls.md lists what was tried):
DEMO_TOKENIZER = "bpe:4096"  # a BPE trained on the KJV training chapters: cheap output layer
DEMO_VOCAB = 4096
DEMO_STEPS = 600  # 1.2M tokens, about 1.2 passes over the training chapters
DEMO_TABLE_STD = 0.1  # small rows move far in few updates (N(0, 1) rows barely train here)
DEMO_TABLE_LR_MULT = 100.0  # each row is read ~50 times per run: it must learn fast


def _moe_backbone(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=128,
        n_layers=4,
        n_heads=4,
        max_seq_len=128,
        ffn="moe",
        n_routed_experts=32,
        moe_top_k=2,
        n_shared_experts=1,
        d_expert=128,
    )


def demo_moe() -> RunConfig:
    """The demo's MoE baseline: 4 layers, d=128, 32 routed experts (top-2) + 1 shared, a
    4,096-id BPE trained on the corpus, 600 steps of 2,048 tokens, one PyTorch thread.

    `optim.table_lr_mult` and `train.table_std` are read by Engram models only: they are set
    here so that the planned Engram preset and its controls inherit them.
    """
    return RunConfig(
        name="moe",
        model=_moe_backbone(DEMO_VOCAB),
        data=DataConfig(
            source="builtin:kjv",
            tokenizer=DEMO_TOKENIZER,
            seq_len=128,
            batch_size=16,
            val_fraction=0.05,
        ),
        optim=OptimConfig(
            lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, table_lr_mult=DEMO_TABLE_LR_MULT
        ),
        train=TrainConfig(
            steps=DEMO_STEPS,
            eval_every=200,
            eval_batches=8,
            ckpt_every=200,  # an interrupted demo resumes from the last third it finished
            log_every=10,
            threads=1,
            table_std=DEMO_TABLE_STD,
        ),
    )


def demo_engram() -> RunConfig:
    """The demo's Engram model: `demo_moe` with rho=0.75 of its sparse budget left in experts."""
    return plan_for(demo_moe(), DEMO_RHO, name="engram")[0]


def quick_moe() -> RunConfig:
    """A smoke-test-sized `demo_moe`: 80 steps, so that `engram demo --quick` (three models
    side by side) takes under 3 minutes on a 2-core AVX2-only CPU (it took 3 min 34 s there
    with 120 steps, training being ~80% of it)."""
    base = demo_moe()
    return replace(
        base,
        optim=replace(base.optim, warmup_steps=10),
        train=replace(base.train, steps=80, eval_every=40, eval_batches=8, final_eval_batches=16),
    )


def quick_engram() -> RunConfig:
    return plan_for(quick_moe(), DEMO_RHO, name="engram")[0]


def gpt2_moe() -> RunConfig:
    """The first demo's baseline: `demo_moe` with the GPT-2 tokenizer (50,257 ids, whose output
    layer is ~88% of a step's FLOPs), 200 steps, the paper's table init and learning rate."""
    base = demo_moe()
    return replace(
        base,
        name="gpt2-moe",
        model=_moe_backbone(50257),
        data=replace(base.data, tokenizer="gpt2"),
        optim=replace(base.optim, table_lr_mult=5.0),
        train=replace(
            base.train, steps=200, eval_every=100, eval_batches=None, threads=0, table_std=1.0
        ),
    )


def gpt2_engram() -> RunConfig:
    return plan_for(gpt2_moe(), DEMO_RHO, name="gpt2-engram",
                    template=engram_template(n_embed_per_ngram=64))[0]  # fmt: skip


def tiny_moe() -> RunConfig:
    """Seconds-long runs for tests and trying the CLI: 2 layers, d=32, 8 experts."""
    return RunConfig(
        name="tiny-moe",
        model=ModelConfig(
            vocab_size=50257,
            d_model=32,
            n_layers=2,
            n_heads=2,
            max_seq_len=64,
            ffn="moe",
            n_routed_experts=8,
            moe_top_k=2,
            n_shared_experts=1,
            d_expert=32,
        ),
        data=DataConfig(source="builtin:kjv", seq_len=32, batch_size=4, val_fraction=0.05),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=6, eval_every=3, eval_batches=2, final_eval_batches=4, log_every=1),
    )


def tiny_engram() -> RunConfig:
    """`tiny_moe` with half its sparse budget in a small table (2 heads x 8 dims per order)."""
    template = replace(engram_template((1,)), n_embed_per_ngram=16, n_head_per_ngram=2)
    return plan_for(tiny_moe(), 0.5, name="tiny-engram", template=template, tolerance=0.05)[0]


def dense() -> RunConfig:
    """A dense SwiGLU baseline with the demo's backbone (no experts, no memory)."""
    base = demo_moe()
    return replace(base, name="dense", model=replace(base.model, ffn="dense", d_ff=384))


PRESETS: Mapping[str, Callable[[], RunConfig]] = MappingProxyType(
    {
        "demo-moe": demo_moe,
        "demo-engram": demo_engram,
        "quick-moe": quick_moe,
        "quick-engram": quick_engram,
        "gpt2-moe": gpt2_moe,
        "gpt2-engram": gpt2_engram,
        "tiny-moe": tiny_moe,
        "tiny-engram": tiny_engram,
        "dense": dense,
    }
)


def preset(name: str) -> RunConfig:
    """The run configuration called `name` (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
