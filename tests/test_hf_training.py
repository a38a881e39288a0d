"""Training an Engram-augmented Hugging Face model: the three modes, the optimizer grouping, sparse
table gradients, and the `transformers.Trainer` driving `EngramHFOptimizer`.

Tiny random Llama models (3 layers, hidden 32) and a 300-id BPE trained on the fly; offline.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from engram.config import EngramConfig
from engram.hf import (
    EngramHFOptimizer,
    add_engram,
    build_hf_optimizer,
    get_attachment,
    hf_optimizers,
    load_engram,
    prepare_training,
    save_engram,
)
from engram.optim import OptimConfig

TEXTS = [
    "the quick brown fox jumps over the lazy dog. " * 4,
    "in the beginning god created the heaven and the earth. " * 4,
    "a stitch in time saves nine, and the early bird catches the worm. " * 4,
] * 10
CFG = EngramConfig(
    engram_vocab_size=(997, 1009),
    max_ngram_size=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=2,
    layer_ids=(0, 2),
    pad_id=0,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Compressors are cached in a private directory, never the user's ~/.cache/engram."""
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "engram-cache"))


@pytest.fixture(scope="module")
def tok():
    from engram.tokenizer import train_bpe

    return train_bpe(TEXTS, 300)  # eos <|endoftext|> = id 0


@pytest.fixture(scope="module")
def stream(tok) -> torch.Tensor:
    return torch.tensor(tok.encode(" ".join(TEXTS)).ids)  # (N,)


def engram_model(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return add_engram(LlamaForCausalLM(config), CFG, tok)


def windows(stream: torch.Tensor, n: int, length: int = 32) -> torch.Tensor:
    return torch.stack([stream[i * 16 : i * 16 + length] for i in range(n)])  # (n, length)


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's parameters (not Engram's, not LoRA's), cloned."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "engram" not in n and "lora_" not in n
    }


def engram_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in get_attachment(model).named_parameters()}


def train_loop(model, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """Plain loop with `build_hf_optimizer`; returns the losses."""
    opt = build_hf_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0))
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.clip_grad_norm()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def changed(before: dict[str, torch.Tensor], model_params: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, t in before.items() if not torch.equal(t, model_params[n])}


# ---------------------------------------------------------------------------------- modes
def test_adapter_mode_trains_engram_only(tok, stream) -> None:
    model = prepare_training(engram_model(tok), "adapter")
    att = get_attachment(model)
    ids = windows(stream, 4)
    base0, eng0 = base_state(model), engram_state(model)

    opt = build_hf_optimizer(model, OptimConfig(lr=1e-2))
    # groups: tables -> SparseAdam at lr * table_lr_mult, dense Engram -> AdamW, base -> nowhere
    tables = {id(p) for p in att.table_parameters()}
    assert opt.table is not None
    assert {id(p) for g in opt.table.param_groups for p in g["params"]} == tables
    assert opt.table.param_groups[0]["lr"] == pytest.approx(1e-2 * 5.0)
    dense = {id(p) for g in opt.dense.param_groups for p in g["params"]}
    assert dense == {id(p) for p in att.dense_parameters()}
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.is_sparse for p in att.table_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "engram" not in n)
    opt.zero_grad()

    losses = train_loop(model, ids, steps=12)
    assert losses[-1] < losses[0] - 0.1
    assert not changed(base0, dict(model.named_parameters()))  # bit for bit
    moved = changed(eng0, dict(att.named_parameters()))
    assert {f"layers.{lid}.store.weight" for lid in CFG.layer_ids} <= moved
    assert {f"layers.{lid}.value_proj.weight" for lid in CFG.layer_ids} <= moved


def test_lora_mode_stacks_lora_and_engram(tok, stream) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    model = prepare_training(engram_model(tok), "lora", lora=lora)
    assert lora.exclude_modules is None  # the user's config is not modified
    att = get_attachment(model)
    assert not any("lora_" in n for n, _ in att.named_parameters())  # Engram not wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(".engram." in n for n in trainable)
    assert all("lora_" in n or ".engram." in n for n in trainable)

    ids = windows(stream, 4)
    base0 = base_state(model)
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    eng0 = engram_state(model)
    losses = train_loop(model, ids, steps=8)
    assert losses[-1] < losses[0]
    assert not changed(base0, dict(model.named_parameters()))
    assert changed(lora0, dict(model.named_parameters())) == set(lora0)
    assert "layers.0.store.weight" in changed(eng0, dict(att.named_parameters()))


def test_full_mode_trains_the_base_too(tok, stream) -> None:
    model = prepare_training(engram_model(tok), "full")
    ids = windows(stream, 4)
    base0, eng0 = base_state(model), engram_state(model)
    opt = build_hf_optimizer(model)
    n_dense = sum(len(g["params"]) for g in opt.dense.param_groups)
    assert n_dense == len(base0) + len(list(get_attachment(model).dense_parameters()))
    losses = train_loop(model, ids, steps=6)
    assert losses[-1] < losses[0]
    assert changed(base0, dict(model.named_parameters())) == set(base0)
    assert "layers.2.store.weight" in changed(eng0, dict(get_attachment(model).named_parameters()))


def test_prepare_training_refusals(tok, tmp_path: Path) -> None:
    model = engram_model(tok)
    with pytest.raises(ValueError, match="training mode must be one of"):
        prepare_training(model, "partial")
    with pytest.raises(ValueError, match="needs lora="):
        prepare_training(model, "lora")
    with pytest.raises(ValueError, match="applies to mode='lora' only"):
        prepare_training(model, "adapter", lora=object())
    with pytest.raises(ValueError, match="no Engram attached"):
        prepare_training(LlamaForCausalLM(model.config), "adapter")
    save_engram(model, tmp_path / "save")
    served = load_engram(LlamaForCausalLM(model.config), tmp_path / "save", tok, check_base=False,
                         tables="mmap")  # fmt: skip
    with pytest.raises(ValueError, match="cannot train"):
        prepare_training(served, "adapter")
    frozen = engram_model(tok)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_hf_optimizer(frozen)


# ------------------------------------------------------------------ sparse grads and clipping
def test_hf_optimizer_keeps_sparse_table_grads_out_of_clipping(tok, stream) -> None:
    model = prepare_training(engram_model(tok), "adapter")
    att = get_attachment(model)
    ids = windows(stream, 4)
    # why: torch's clip_grad_norm_ cannot take a sparse gradient
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(NotImplementedError):
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    model.zero_grad()

    opt, sched = hf_optimizers(model, OptimConfig(lr=1e-2))
    assert sched is None and isinstance(opt, EngramHFOptimizer)
    for _ in range(2):  # two micro-batches: table grads accumulate in the optimizer
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in att.table_parameters())
    held = opt.table_grads()
    assert len(held) == len(att.table_parameters())
    assert all(g.is_sparse for g in held.values())
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)  # dense grads only
    assert math.isfinite(float(norm))

    # one more step so that value_proj is non-zero and table rows move
    opt.step()
    model.zero_grad()
    before = [p.detach().clone() for p in att.table_parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    touched = {int(r) for r in opt.table_grads()[id(att.table_parameters()[0])]._indices()[0]}
    opt.step()
    rows_moved = (att.table_parameters()[0] != before[0]).any(dim=1).nonzero().flatten()
    assert set(rows_moved.tolist()) == touched  # SparseAdam: exactly the touched rows
    assert not opt.table_grads() and all(p.grad is None for p in att.table_parameters())


def test_newest_hf_optimizer_owns_the_table_grads(tok, stream) -> None:
    import io
    import pickle

    model = prepare_training(engram_model(tok), "adapter")
    ids = windows(stream, 2)
    old, _ = hf_optimizers(model)
    new, _ = hf_optimizers(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert not old.table_grads() and len(new.table_grads()) == len(CFG.layer_ids)
    new.remove_hooks()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()  # no hook left: grads stay in .grad
    assert all(p.grad.is_sparse for p in get_attachment(model).table_parameters())
    pickle.dumps(get_attachment(model).table_parameters())  # nothing unpicklable hangs on them
    torch.save(model.state_dict(), io.BytesIO())


def test_hf_optimizer_groups_follow_the_inner_optimizers(tok) -> None:
    model = prepare_training(engram_model(tok), "adapter")
    opt, _ = hf_optimizers(model, OptimConfig(lr=2e-3, table_lr_mult=4.0))
    inner = opt.engram
    groups = opt.param_groups
    assert groups[: len(inner.dense.param_groups)] == inner.dense.param_groups
    assert groups[-1] is inner.table.param_groups[0] and groups[-1]["lr"] == pytest.approx(8e-3)
    state = opt.state_dict()
    assert set(state) == {"dense", "table"}
    opt.load_state_dict(state)  # replaces the inner group dicts ...
    opt.param_groups[-1]["lr"] = 1.0  # ... and the outer view still reaches them
    assert inner.table.param_groups[0]["lr"] == 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert inner.dense.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert inner.table.param_groups[0]["lr"] == pytest.approx(0.5)
    del sched
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": []})


# --------------------------------------------------------------------------------- Trainer
class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # (n, T)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class _LrLog(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def test_trainer_trains_with_engram_optimizer(tok, stream, tmp_path: Path) -> None:
    model = prepare_training(engram_model(tok), "adapter")
    att = get_attachment(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
        learning_rate=1e-2, warmup_steps=2, lr_scheduler_type="linear", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )  # fmt: skip  # max_grad_norm stays at its default 1.0: clipping covers dense grads
    base0, tables0 = base_state(model), [p.detach().clone() for p in att.table_parameters()]
    log = _LrLog()
    trainer = Trainer(
        model=model, args=args, train_dataset=_Windows(windows(stream, 24)),
        optimizers=hf_optimizers(model, args=args), callbacks=[log],
    )  # fmt: skip
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 6
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    for before, p in zip(tables0, att.table_parameters(), strict=True):
        assert (before != p.detach()).any(dim=1).sum() > 0  # table rows moved
    assert not changed(base0, dict(model.named_parameters()))
    # the scheduler drives both inner optimizers; tables keep their 5x ratio
    assert len(log.lrs) == 6 and max(lr[0] for lr in log.lrs) == pytest.approx(1e-2)
    for lrs in log.lrs:
        assert lrs[-1] == pytest.approx(5.0 * lrs[0])


def test_trainer_resume_reproduces_the_run(tok, stream, tmp_path: Path) -> None:
    def run(out: Path, resume: str | None = None, max_steps: int = 4) -> list[torch.Tensor]:
        model = prepare_training(engram_model(tok), "adapter")
        args = TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
            learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[],
            use_cpu=True, seed=0, logging_steps=1,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=_Windows(windows(stream, 24)),
            optimizers=hf_optimizers(model, args=args),
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return [p.detach().clone() for p in get_attachment(model).parameters()]

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed, strict=True))
