"""Training a Hugging Face model with Engram: what trains (`prepare_training`) and the optimizers.

Modes (`prepare_training(model, mode)`):
    adapter   the base is frozen; only Engram trains (tables and dense weights)
    lora      a `peft` LoRA adapter on the base, stacked with Engram: both train, the base is
              frozen. `peft.get_peft_model` freezes every non-LoRA parameter, Engram's included,
              so Engram's are made trainable again afterwards; Engram's own Linear layers are
              excluded from the adapter (a copy of the LoraConfig gets an `exclude_modules`
              pattern), so "all-linear" targets the base only.
    full      everything trains.

Design choices:
- One grouping, `engram.optim.build_optimizer`, reused rather than duplicated: it is handed a
  view of the model that shows only the parameters that require grad, so frozen parameters
  never enter an optimizer (no state, no weight decay). Tables get SparseAdam at
  `lr * table_lr_mult`, no decay; dense trainable parameters (Engram's, LoRA's, the base's in
  full mode) get AdamW with decay on matrices. The result is an `EngramOptimizer` for a custom
  loop (`set_lr`, `clip_grad_norm` over the dense gradients, `step`, `zero_grad`).
- The Hugging Face `Trainer` wants ONE `torch.optim.Optimizer` that its LR scheduler drives.
  `EngramHFOptimizer` is one whose `param_groups` are the very dict objects of the inner
  AdamW's and SparseAdam's groups (dense first), read afresh on every access, so the
  scheduler's `lr` writes reach both inner optimizers and survive `load_state_dict` (which
  replaces the inner groups). Its state dict is the inner optimizers' ({"dense", "table"}).
- Sparse gradients and the Trainer's clipping: `torch.nn.utils.clip_grad_norm_` raises
  NotImplementedError on a sparse gradient (torch 2.13: no `linalg_vector_norm` for
  SparseCPU), and transformers 5.x computes the norm over `model.parameters()` every step even
  with `max_grad_norm=0`. So `EngramHFOptimizer` takes each table's sparse gradient out of
  `.grad` as soon as it is accumulated (a post-accumulate-grad hook; micro-batches add up in
  its own buffer) and hands it to SparseAdam in `step`. The Trainer then clips and logs the
  norm of the dense gradients only -- engram's own rule (`engram.optim`: table rows are each
  normalised by their Adam second moment, so the number of rows a batch touches must not
  scale the dense step). One consequence: fp16 with a GradScaler would not unscale the table
  gradients; use bf16 (or fp32).
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from engram.hf.attach import EngramAttachment, get_attachment
from engram.optim import EngramOptimizer, OptimConfig, _unique, build_optimizer

MODES = ("adapter", "lora", "full")
# A peft `exclude_modules` pattern (re.fullmatch on module names) for the Engram attachment.
ENGRAM_MODULES = r"(?:.*\.)?engram(?:\..*)?"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _wrapped_engram(att: EngramAttachment) -> list[str]:
    """Engram modules a peft adapter wrapped (their parameter names grew lora_/base_layer)."""
    names = [n for n, _ in att.named_parameters()]
    bad = [
        n for n in names if any(p.startswith("lora_") or p == "base_layer" for p in n.split("."))
    ]
    return sorted({n.split(".lora_")[0].split(".base_layer")[0] for n in bad})


def exclude_engram(config: Any) -> Any:
    """A copy of a peft config whose `exclude_modules` also covers Engram's modules."""
    config = copy.deepcopy(config)
    ex = getattr(config, "exclude_modules", None)
    if not ex:
        config.exclude_modules = ENGRAM_MODULES
    elif isinstance(ex, str):
        config.exclude_modules = f"(?:{ex})|{ENGRAM_MODULES}"
    else:  # peft's list semantics: the name itself or a ".name" suffix
        names = "|".join(re.escape(str(n)) for n in ex)
        config.exclude_modules = rf"(?:.*\.)?(?:{names})|{ENGRAM_MODULES}"
    return config


def _check_tables_train(att: EngramAttachment) -> None:
    for lid, layer in att.engram_layers().items():
        if not layer.table_parameters() and not hasattr(layer.store, "adam_step"):
            raise ValueError(
                f"Engram layer {lid}'s table is served by {type(layer.store).__name__}, which "
                "cannot train (read-only tiers are for generation); load it with tables='ram'"
            )


def prepare_training(model: nn.Module, mode: str, *, lora: Any = None) -> nn.Module:
    """Set what trains for `mode` ("adapter", "lora" or "full"); returns the model to train.

    `lora` (mode "lora" only) is a `peft.LoraConfig`; the returned model is then the
    `peft.get_peft_model` wrapper (Engram stays reachable through `get_attachment`).
    """
    if mode not in MODES:
        raise ValueError(f"training mode must be one of {list(MODES)}, got {mode!r}")
    if (mode == "lora") != (lora is not None):
        raise ValueError(
            "mode='lora' needs lora=peft.LoraConfig(...)"
            if mode == "lora"
            else f"lora= applies to mode='lora' only (mode is {mode!r})"
        )
    att = get_attachment(model)
    _check_tables_train(att)
    if mode == "lora":
        if _is_peft(model):
            raise ValueError(
                f"{type(model).__name__} is already a peft model; pass the model with Engram "
                "attached and no adapter"
            )
        from peft import get_peft_model

        model = get_peft_model(model, exclude_engram(lora))
        wrapped = _wrapped_engram(att)
        if wrapped:
            raise ValueError(
                f"the LoRA config wrapped Engram's own modules {wrapped[:3]}; narrow its "
                "target_modules or exclude_modules"
            )
    else:
        for p in model.parameters():
            p.requires_grad_(mode == "full")
    for p in att.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------- custom-loop optimizer
class _TrainableView:
    """What `engram.optim.build_optimizer` reads of a model, restricted to trainable params."""

    def __init__(self, model: nn.Module, att: EngramAttachment) -> None:
        self._params = [p for p in _unique(model.parameters()) if p.requires_grad]
        self._att = att

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._params)

    def modules(self) -> Iterator[nn.Module]:
        return self._att.modules()  # only Engram's stores may be dense-gradient tables

    def engram_layers(self) -> dict[int, Any]:
        return self._att.engram_layers()

    def table_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._att.table_parameters() if p.requires_grad]


def build_hf_optimizer(model: nn.Module, optim_cfg: OptimConfig | None = None) -> EngramOptimizer:
    """SparseAdam for Engram's trainable tables, AdamW for every other trainable parameter.

    Frozen parameters are left out. Tables learn at `optim_cfg.lr * optim_cfg.table_lr_mult`.
    For a custom loop: `opt.set_lr(engram.optim.lr_multiplier(...))`, `opt.clip_grad_norm()`
    (dense gradients only), `opt.step()`, `opt.zero_grad()`.
    """
    cfg = optim_cfg or OptimConfig()
    view = _TrainableView(model, get_attachment(model))
    if not view._params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter; call "
            "engram.hf.prepare_training(model, mode) first"
        )
    return build_optimizer(view, cfg, table_params=view.table_parameters())  # type: ignore[arg-type]


# -------------------------------------------------------------------------- Trainer optimizer
# id(table parameter) -> (the parameter, the EngramHFOptimizer that owns its gradients), both
# weak; kept here rather than as an attribute of the parameter, which would stop it pickling.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner(p: Tensor) -> Any:
    rec = _OWNERS.get(id(p))
    return rec[1]() if rec is not None and rec[0]() is p else None


def _claim(p: Tensor, opt: Any) -> None:
    for key, (param, owner) in list(_OWNERS.items()):  # forget dead entries
        if param() is None or owner() is None:
            del _OWNERS[key]
    _OWNERS[id(p)] = (weakref.ref(p), weakref.ref(opt))


def _stash_hook(ref: weakref.ReferenceType) -> Any:
    def hook(p: Tensor) -> None:
        opt = ref()
        if opt is not None and _owner(p) is opt:
            opt._take_grad(p)

    return hook


def _remove(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class EngramHFOptimizer(torch.optim.Optimizer):
    """One `torch.optim.Optimizer` over an `EngramOptimizer`, for the Hugging Face `Trainer`.

    `param_groups` are the inner AdamW's groups then the inner SparseAdam's (the same dict
    objects), so an LR scheduler drives both; tables keep their `table_lr_mult` ratio because
    the scheduler scales each group's own initial lr. Table gradients are kept out of `.grad`
    (see the module docstring) and reach SparseAdam in `step`. One such optimizer owns a
    model's table gradients at a time: a newer one takes them over.
    """

    def __init__(self, inner: EngramOptimizer) -> None:
        self.engram = inner
        self._initialising = True
        super().__init__([{"params": []}], {})  # registers nothing: the groups are inner's
        self._initialising = False
        self._stash: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._tables: list[nn.Parameter] = (
            [p for g in inner.table.param_groups for p in g["params"]] if inner.table else []
        )
        ref = weakref.ref(self)
        self._handles: list[Any] = []
        for p in self._tables:
            _claim(p, self)
            self._handles.append(p.register_post_accumulate_grad_hook(_stash_hook(ref)))
        weakref.finalize(self, _remove, self._handles)

    # ------------------------------------------------------------------ the inner groups
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        inner = self.engram
        table = inner.table.param_groups if inner.table is not None else []
        return [*inner.dense.param_groups, *table]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if self._initialising and not groups:
            return
        n = len(self.engram.dense.param_groups)
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"EngramHFOptimizer has {len(self.param_groups)} param groups (the inner "
                f"optimizers'), got {len(groups)}"
            )
        self.engram.dense.param_groups = list(groups[:n])
        if self.engram.table is not None:
            self.engram.table.param_groups = list(groups[n:])

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:
        """The inner optimizers' per-parameter state, merged (read-only view)."""
        inner = self.engram
        table = inner.table.state if inner.table is not None else {}
        return {**inner.dense.state, **table}

    @state.setter
    def state(self, value: Any) -> None:
        if not self._initialising:
            raise AttributeError("EngramHFOptimizer's state is its inner optimizers' state")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._initialising:
            return
        raise NotImplementedError(
            "EngramHFOptimizer's groups are fixed by build_hf_optimizer; build a new one"
        )

    # ------------------------------------------------------------------ gradients
    def _take_grad(self, p: nn.Parameter) -> None:
        g = p.grad
        if g is None:
            return
        p.grad = None
        prev = self._stash.get(id(p))
        self._stash[id(p)] = (p, g if prev is None else prev[1] + g)

    def table_grads(self) -> dict[int, Tensor]:
        """The table gradients held for the next step: {id(param): sparse grad}."""
        return {k: g for k, (_, g) in self._stash.items()}

    def remove_hooks(self) -> None:
        """Stop collecting table gradients (tables then keep theirs in `.grad` again)."""
        _remove(self._handles)

    # ------------------------------------------------------------------ Optimizer API
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, g in self._stash.values():
            p.grad = g.coalesce() if g.is_sparse else g
        self._stash.clear()
        inner = self.engram
        if inner.table is not None:
            inner.table_lr = float(inner.table.param_groups[0]["lr"])  # for tables on disk
        inner.step()
        for p in self._tables:
            p.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._stash.clear()
        self.engram.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return self.engram.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engram.load_state_dict(dict(state_dict))


def optim_config_from_args(args: Any, table_lr_mult: float = 5.0) -> OptimConfig:
    """An `OptimConfig` with a `transformers.TrainingArguments`' lr, decay, betas, eps, clip."""
    return OptimConfig(
        lr=float(args.learning_rate),
        table_lr_mult=float(table_lr_mult),
        weight_decay=float(args.weight_decay),
        beta1=float(args.adam_beta1),
        beta2=float(args.adam_beta2),
        eps=float(args.adam_epsilon),
        grad_clip=float(args.max_grad_norm or 0.0),
    )


def hf_optimizers(
    model: nn.Module, optim_cfg: OptimConfig | None = None, *, args: Any = None
) -> tuple[EngramHFOptimizer, None]:
    """`(optimizer, None)` for `transformers.Trainer(optimizers=...)`; the Trainer builds the
    LR schedule from its arguments on top of each group's lr.

    `optim_cfg` gives the rates (tables at `lr * table_lr_mult`); without it they come from
    `args` (a `TrainingArguments`, via `optim_config_from_args`), else `OptimConfig()`.
    """
    if optim_cfg is None:
        optim_cfg = OptimConfig() if args is None else optim_config_from_args(args)
    return EngramHFOptimizer(build_hf_optimizer(model, optim_cfg)), None
