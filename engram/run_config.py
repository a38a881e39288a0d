"""The resolved configuration of one training run, its json form, and `key=value` overrides.

Design choices:
- A run is five dataclasses, each owned by the module that uses it: `ModelConfig` (backbone),
  `EngramConfig` (memory; None for a baseline), `DataConfig`, `OptimConfig`, and `TrainConfig`
  (the loop's own knobs, defined here). `RunConfig` only groups them, so the model never sees
  the loop's settings and the loop never reaches into the model's.
- A sixth, optional section, `BaseConfig`, makes a local Hugging Face causal LM the backbone
  (`engram train --base PATH`). Such a run has no `model` section (`"model": null`): the base's
  own config.json describes the backbone and is recorded in `base.hf_config` with a fingerprint
  of the base (model type, config and weight files), so a resume or a load refuses another
  base. Runs without a base serialise exactly as before (no `base` key).
- The resolved config is written as json next to every run's outputs and inside every
  checkpoint; `RunConfig.from_dict` rejects unknown keys anywhere, naming them, so a typo in a
  config file is an error, not a silently ignored setting.
- Overrides are `section.field=value` (or a bare `field=value` when the name is unique across
  sections). Values are parsed as JSON (`3`, `0.5`, `true`, `[1, 2]`, `null`) and fall back to a
  plain string; the type is checked against the field's current value before the dataclass
  re-validates the whole section.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram.atomic import atomic_write_text
from engram.config import EngramConfig
from engram.data import DataConfig
from engram.model import ModelConfig
from engram.optim import OptimConfig


class ConfigError(ValueError):
    """A config file or override that does not describe a valid run."""


TABLE_STORES = ("ram", "mmap")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's own settings."""

    # Optimizer steps to run in total (a resumed run continues up to this step).
    steps: int = 200
    # Micro-batches per optimizer step (gradient accumulation); tokens/step = this * B * T.
    grad_accum: int = 1
    # Run validation every this many steps (and always at the end); 0 = only at the end.
    eval_every: int = 50
    # Validation batches per periodic evaluation (None = the whole validation split).
    eval_batches: int | None = 16
    # Validation batches of the final evaluation (None = the whole split: the reported number).
    final_eval_batches: int | None = None
    # Write a checkpoint every this many steps (and always at the end); 0 = only at the end.
    ckpt_every: int = 0
    # Checkpoints kept on disk (oldest deleted first); 0 keeps all.
    keep_checkpoints: int = 2
    # Print/log the training loss every this many steps.
    log_every: int = 10
    # Seed of model init and of the batch order (data is a pure function of seed and step).
    seed: int = 0
    # Std of the Engram tables' normal init (the demo's nn.Embedding default is 1.0).
    table_std: float = 1.0
    # bf16 autocast for the forward (CPU: measured slower on this machine, so off by default).
    bf16: bool = False
    # torch.compile the model (off by default: compile time dominates short CPU runs).
    compile: bool = False
    # Batches the background loader prepares (and hashes) ahead of the step.
    prefetch: int = 2
    # Where the model trains: "cpu" (bit-reproducible, the default), "cuda", "cuda:1", ...
    device: str = "cpu"
    # PyTorch intra-op threads while training (0 = leave PyTorch's setting). CPU runs are
    # bit-reproducible for a fixed count; another count changes float summation order.
    threads: int = 0
    # Where Engram tables live while training: "ram" (a parameter + SparseAdam) or "mmap" (rows
    # and Adam moments in files under <run>/tables/, for tables larger than RAM; same updates).
    table_store: str = "ram"

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.table_store not in TABLE_STORES:
            raise ValueError(
                f"train.table_store must be one of {list(TABLE_STORES)}, got {self.table_store!r}"
            )
        for name in ("eval_every", "ckpt_every", "keep_checkpoints", "log_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"train.device {self.device!r} is not a torch device: {e}") from None
        for name in ("eval_batches", "final_eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1 or null, got {value}")


BASE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class BaseConfig:
    """A local Hugging Face causal LM as the run's backbone (see `engram.hf.base`)."""

    # A local model directory (config.json + weights, as save_pretrained writes); never downloaded.
    path: str
    # True ("full"): the base's weights train too; False ("adapter"): frozen, only Engram trains.
    train_base: bool = True
    # Dtype the base is loaded in: float32 (bit-reproducible on CPU) or bfloat16 (half the memory
    # of a frozen base; Engram itself always computes in float32).
    dtype: str = "float32"
    # sha256 of the base (model type, config, weight files), filled in when the run starts: a
    # resume, an evaluation or a load refuses a base that differs.
    fingerprint: str | None = None
    # The base's config.json when the run started (provenance; the fingerprint covers it).
    hf_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"base.path must be a model directory, got {self.path!r}")
        if not isinstance(self.train_base, bool):
            raise ValueError(f"base.train_base must be true or false, got {self.train_base!r}")
        if self.dtype not in BASE_DTYPES:
            raise ValueError(f"base.dtype must be one of {list(BASE_DTYPES)}, got {self.dtype!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise ValueError(f"base.fingerprint must be a string or null, got {self.fingerprint!r}")
        if self.hf_config is not None and not isinstance(self.hf_config, dict):
            raise ValueError(f"base.hf_config must be an object or null, got {self.hf_config!r}")

    @property
    def mode(self) -> str:
        """ "full" (the base trains) or "adapter" (frozen base, only Engram trains)."""
        return "full" if self.train_base else "adapter"


_SECTIONS: dict[str, type] = {
    "base": BaseConfig,
    "model": ModelConfig,
    "engram": EngramConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; written to `<out>/config.json`."""

    # A label for tables and plots.
    name: str = "run"
    # The backbone; None (and not given) with a base model, whose own config describes it.
    model: ModelConfig | None = None
    # The memory; None trains the backbone alone (the baseline).
    engram: EngramConfig | None = None
    # Where the tokens come from and how they are batched.
    data: DataConfig = field(default_factory=DataConfig)
    # Both optimizers and the schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The loop.
    train: TrainConfig = field(default_factory=TrainConfig)
    # A Hugging Face model as the backbone instead of `model`; None: engram's own EngramLM.
    base: BaseConfig | None = None

    def __post_init__(self) -> None:
        if self.base is None and self.model is None:
            object.__setattr__(self, "model", ModelConfig())
        elif self.base is not None and self.model is not None:
            raise ConfigError(
                f"a run with a base model (base.path={self.base.path!r}) takes its backbone from "
                "the base's own config: its model section must be null"
            )
        if self.base is not None and not self.base.train_base and self.engram is None:
            raise ConfigError(
                "base.train_base=false freezes the base model and the run has no Engram layers: "
                "nothing would train (train the base, or add an engram section)"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for section in _SECTIONS:
            value = getattr(self, section)
            if section == "base" and value is None:
                continue  # runs without a base serialise as they always did
            out[section] = None if value is None else _section_dict(value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"name", *_SECTIONS})
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {unknown}; expected name, {', '.join(_SECTIONS)}"
            )
        kwargs: dict[str, Any] = {"name": str(d.get("name", "run"))}
        for section, klass in _SECTIONS.items():
            if section not in d:
                continue
            value = d[section]
            if value is None:
                if section not in ("engram", "base", "model"):
                    raise ConfigError(f"config section {section!r} cannot be null")
                if section == "model" and d.get("base") is None:
                    raise ConfigError(
                        "config section 'model' cannot be null (only a run with a base model "
                        "has none)"
                    )
                kwargs[section] = None
                continue
            kwargs[section] = _build_section(section, klass, value)
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _section_dict(obj: Any) -> dict[str, Any]:
    to_dict = getattr(obj, "to_dict", None)
    d = to_dict() if callable(to_dict) else dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _build_section(section: str, klass: type, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"config section {section!r} must be an object, got {value!r}")
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; {section} has {sorted(known)}"
        )
    try:
        from_dict = getattr(klass, "from_dict", None)
        return from_dict(value) if callable(from_dict) else klass(**value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {section} config: {e}") from e


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_type(key: str, current: Any, value: Any) -> Any:
    """Coerce/validate `value` against the type of the field's current value."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects true or false, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        return float(value)
    if isinstance(current, tuple | list):
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list such as [1, 2], got {value!r}")
        return value
    if isinstance(current, str) and not isinstance(value, str):
        return json.dumps(value) if not isinstance(value, int | float) else str(value)
    return value


def base_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why two run-config dicts name different base models (one line), or None if they do not.

    Compares the bases' fingerprints (a config without a base has none): the same directory
    whose weights changed is another base.
    """
    a, b = old.get("base") or {}, new.get("base") or {}
    fa, fb = a.get("fingerprint"), b.get("fingerprint")
    if not a and not b:
        return None
    if not a or not b:
        which = "without" if not a else "with"
        return (
            f"it was trained {which} a base model, this config is "
            f"{'with base ' + repr(b.get('path')) if b else 'without one'}"
        )
    if fa is not None and fb is not None and fa != fb:
        return (
            f"it was trained from base model {a.get('path')!r} with fingerprint {fa[:12]}, but "
            f"{b.get('path')!r} now has fingerprint {fb[:12]} (another or a modified base)"
        )
    return None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Return `cfg` with each `section.field=value` (or unique `field=value`) applied."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text.strip())
        if key == "name":
            d["name"] = str(value)
            continue
        if key == "engram" and value is None:
            d["engram"] = None
            continue
        if "." in key:
            section, name = key.split(".", 1)
        else:
            owners = [
                s for s, k in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(k)}
            ]
            if len(owners) != 1:
                hint = f"one of {[f'{s}.{key}' for s in owners]}" if owners else "section.field"
                raise ConfigError(
                    f"override key {key!r} is {'ambiguous' if owners else 'unknown'}; use {hint}"
                )
            section, name = owners[0], key
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown config section {section!r} in {item!r}; expected one of {list(_SECTIONS)}"
            )
        fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; {section} has {sorted(fields)}")
        if d.get(section) is None:
            if section == "model" and d.get("base") is not None:
                raise ConfigError(
                    f"{key} does not apply: this run's backbone is the base model "
                    f"{d['base']['path']!r}, described by its own config.json"
                )
            if section == "base":
                raise ConfigError(
                    f"{key} does not apply: this run has no base model (start one with "
                    "`engram train --base PATH`)"
                )
            if section != "engram":
                raise ConfigError(f"config section {section!r} is missing")
            d["engram"] = _section_dict(EngramConfig())
        d[section][name] = _check_type(key, d[section].get(name), value)
    return RunConfig.from_dict(d)
