"""Hugging Face base models as engram backbones: read, fingerprint, load, create and export.

A base is a local model directory as `save_pretrained` writes it: config.json plus
model.safetensors (or shards with an index; pytorch_model.bin is accepted). Nothing is ever
downloaded (`local_files_only=True`).

Design choices:
- The directory is checked from its config.json before any weight is read or `transformers`
  is imported: not a directory, no config, no weights, or a family `engram.hf` cannot attach to
  (named by its model class) is one line, and nothing is written.
- Fingerprint: sha256 over the model type, the config (without the fields `save_pretrained`
  rewrites on its own: `transformers_version`, `_name_or_path`) and the sha256 of every weight
  file. `resolve_base` records it (and the config, for provenance) in the run config when a
  run starts; every later load for that run (resume, eval, generate, analyses, export) checks
  it, so a base that changed under a run is refused rather than mixed with the run's trained
  weights. Weight digests are memoised per (file, size, mtime) within a process.
- `base_run_config` is what `engram train --base PATH` starts from: the base's own tokenizer
  (`tokenizer.json` in the directory), sequences of at most 128 tokens (or the base's
  positions), engram's default optimizer and loop, and an Engram config sized like the small
  presets' (orders 2-3, 4 heads x 8 dims per order) at layers 1 and n/2 (clamped to the model),
  its pad id the tokenizer's end-of-document id; or no Engram (the base trains alone).
- `init_base` writes a random-init model directory (one of the supported families, with a
  tokenizer), the first step of pretraining a plain model (`engram.hf.export.export_base`
  turns a finished run back into one). This module sits below the trainer: `engram.train`
  builds base runs through `engram.hf.lm`, which reads bases through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram.hf.families import FAMILIES, UnsupportedModelError
from engram.run_config import BaseConfig, ConfigError, RunConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Config fields save_pretrained rewrites without changing the model (left out of the fingerprint).
VOLATILE_KEYS = ("transformers_version", "_name_or_path")
# model_type -> config names of (decoder layers, hidden size, attention heads, positions).
_SHAPE_KEYS = {"gpt2": ("n_layer", "n_embd", "n_head", "n_positions")}
_DEFAULT_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "max_position_embeddings",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_TABLE_SIZE = 20_000  # target rows per sub-table (`engram info`'s default)
DEFAULT_SEQ_LEN = 128


class BaseModelError(ConfigError):
    """A base model directory that cannot be used (or is not the one a run was trained from)."""


@dataclass(frozen=True)
class BaseInfo:
    """What a base model directory's config.json says, and its weight files."""

    path: Path
    config: dict[str, Any]  # config.json, without the volatile keys
    model_type: str
    architecture: str  # the model class config.json names (or the model type)
    n_layers: int
    hidden_size: int
    n_heads: int
    max_positions: int | None
    vocab_size: int
    weight_files: tuple[Path, ...]


def _where(path: str | os.PathLike[str]) -> str:
    return repr(os.fspath(path))


def read_base(path: str | os.PathLike[str]) -> BaseInfo:
    """Check a base model directory from its files (no weights read); `BaseModelError` or
    `UnsupportedModelError` (naming the model class) when it cannot serve as a base."""
    p = Path(path).expanduser()
    hint = "expected a local Hugging Face model directory (config.json + weights, as save_pretrained writes)"
    if not p.is_dir():
        what = "does not exist" if not p.exists() else "is not a directory"
        raise BaseModelError(f"base model {_where(path)} {what}; {hint}")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise BaseModelError(f"base model {_where(path)} has no {CONFIG_FILE}: {hint}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaseModelError(f"{cfg_file} is not a readable JSON config: {e}") from None
    if not isinstance(config, dict):
        raise BaseModelError(f"{cfg_file} is not a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    arch = str(archs[0]) if archs else f"a {model_type!r} model"
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"base model {_where(path)}: {arch} (model_type={model_type!r}) is not a supported "
            f"architecture; engram can attach to {', '.join(sorted(FAMILIES))}"
        )
    if (
        archs
        and not str(archs[0]).endswith("ForCausalLM")
        and not str(archs[0]).endswith("LMHeadModel")
    ):
        raise UnsupportedModelError(
            f"base model {_where(path)}: {arch} is not a causal language model (expected a "
            f"*ForCausalLM / *LMHeadModel of {model_type!r})"
        )
    keys = _SHAPE_KEYS.get(model_type, _DEFAULT_KEYS)
    try:
        n_layers, hidden, heads = (int(config[k]) for k in keys[:3])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise BaseModelError(f"{cfg_file} lacks a usable {e} for a {model_type} model") from None
    positions = config.get(keys[3])
    return BaseInfo(
        path=p,
        config={k: v for k, v in config.items() if k not in VOLATILE_KEYS},
        model_type=str(model_type),
        architecture=arch,
        n_layers=n_layers,
        hidden_size=hidden,
        n_heads=heads,
        max_positions=int(positions) if isinstance(positions, int) else None,
        vocab_size=vocab,
        weight_files=_weight_files(p, path),
    )


def _weight_files(p: Path, shown: str | os.PathLike[str]) -> tuple[Path, ...]:
    for index in INDEX_FILES:
        f = p / index
        if f.is_file():
            try:
                names = sorted(
                    set(json.loads(f.read_text(encoding="utf-8"))["weight_map"].values())
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise BaseModelError(f"{f} is not a readable weight index: {e}") from None
            missing = [n for n in names if not (p / n).is_file()]
            if missing:
                raise BaseModelError(
                    f"base model {_where(shown)}: {index} names missing {missing[:3]}"
                )
            return tuple(p / n for n in names)
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return (p / name,)
    raise BaseModelError(
        f"base model {_where(shown)} has no weights ({', '.join(WEIGHT_FILES)} or a sharded "
        "index); save the model with save_pretrained"
    )


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def base_fingerprint(info: BaseInfo) -> str:
    """sha256 of the base's model type, config and weight files (see the module docstring)."""
    weights = {}
    for f in info.weight_files:
        st = f.stat()
        weights[f.name] = _file_sha256(str(f.resolve()), st.st_size, st.st_mtime_ns)
    payload = {"model_type": info.model_type, "config": info.config, "weights": weights}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_base(base: BaseConfig) -> BaseInfo:
    """The base of a run config, refused if it differs from the fingerprint the run recorded."""
    info = read_base(base.path)
    if base.fingerprint is not None:
        now = base_fingerprint(info)
        if now != base.fingerprint:
            raise BaseModelError(
                f"the base model at {base.path!r} is not the one this run was trained from "
                f"(fingerprint {now[:12]}, the run recorded {base.fingerprint[:12]}): its "
                "weights or config changed; restore that base or train a new run"
            )
    return info


def resolve_base(cfg: RunConfig) -> RunConfig:
    """`cfg` with its base's fingerprint and config recorded (checked if already recorded)."""
    if cfg.base is None:
        return cfg
    info = check_base(cfg.base)
    if cfg.base.fingerprint is not None and cfg.base.hf_config is not None:
        return cfg
    base = replace(cfg.base, fingerprint=base_fingerprint(info), hf_config=info.config)
    return replace(cfg, base=base)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or info logs from `transformers` inside the block."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_base_model(info: BaseInfo, dtype: str = "float32") -> nn.Module:
    """The causal LM of a checked base directory, on the CPU in `dtype` (never downloads)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(
            f"a base model needs transformers, which is not installed: pip install "
            f"'engram-lm[hf]' ({e})",
            name="transformers",
        ) from e
    with quiet_transformers():
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(info.path), local_files_only=True, dtype=DTYPES[dtype]
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise BaseModelError(
                f"cannot load base model {str(info.path)!r} ({info.architecture}): "
                f"{' '.join(str(e).split())[:300]}"
            ) from None


# -------------------------------------------------------------------------------- run configs
def default_layer_ids(n_layers: int) -> tuple[int, ...]:
    """Engram at layers 1 and n/2 (0-based; the paper's 2 and ~half depth), within the model."""
    return tuple(sorted({min(1, n_layers - 1), max(0, min(n_layers // 2, n_layers - 1))}))


def base_run_config(
    path: str,
    *,
    engram: bool = True,
    layers: Sequence[int] | None = None,
    table_size: int | None = None,
    train_base: bool = True,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """The run config of `engram train --base PATH` (see the module docstring), with
    `section.field=value` overrides applied; the Engram pad id follows the final tokenizer
    unless an override sets it."""
    from engram.data import DataConfig
    from engram.data.tokenize import data_tokenizer
    from engram.presets import engram_template
    from engram.run_config import apply_overrides
    from engram.tokenizer import separator_id

    info = read_base(path)
    engram_cfg = None
    if engram:
        ids = tuple(layers) if layers else default_layer_ids(info.n_layers)
        bad = [i for i in ids if not 0 <= i < info.n_layers]
        if bad:
            raise BaseModelError(
                f"Engram layer ids {bad} are outside {info.architecture}'s {info.n_layers} decoder "
                f"layers (0..{info.n_layers - 1})"
            )
        size = DEFAULT_TABLE_SIZE if table_size is None else int(table_size)
        engram_cfg = replace(engram_template(ids), engram_vocab_size=(size, size))
    elif layers or table_size:
        raise ConfigError(
            "--layers and --table-size size Engram layers; drop them with --no-engram"
        )
    seq_len = min(DEFAULT_SEQ_LEN, info.max_positions or DEFAULT_SEQ_LEN)
    # Absolute, so the run's config.json reads the same base from any working directory.
    where = Path(path).expanduser().resolve()
    name = where.name or "base"
    cfg = RunConfig(
        name=f"{name}-engram" if engram else name,
        base=BaseConfig(path=str(where), train_base=train_base),
        engram=engram_cfg,
        data=DataConfig(tokenizer=str(where), seq_len=seq_len),
    )
    cfg = apply_overrides(cfg, list(overrides))
    tokenizer = data_tokenizer(cfg.data)
    check_tokenizer_fits(info, tokenizer, cfg.data.tokenizer)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if cfg.engram is not None and not keys & {"engram.pad_id", "pad_id"}:
        cfg = replace(cfg, engram=replace(cfg.engram, pad_id=separator_id(tokenizer)))
    return cfg


def check_tokenizer_fits(info: BaseInfo, tokenizer: Any, spec: str) -> None:
    """Refuse a tokenizer with more ids than the base's config says its embedding has."""
    from engram.compress import tokenizer_vocab_size

    n = tokenizer_vocab_size(tokenizer)
    if n > info.vocab_size:
        raise BaseModelError(
            f"the tokenizer (data.tokenizer={spec!r}) has {n:,} ids but the base model "
            f"{info.architecture} at {str(info.path)!r} embeds {info.vocab_size:,}: it is not "
            "this model's tokenizer"
        )


# ------------------------------------------------------------------------- model directories
def check_new_dir(out: Path) -> None:
    """Refuse an `--out` that exists and is not an empty directory (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BaseModelError(
            f"--out {str(out)!r} already exists and is not an empty directory; choose a new one"
        )


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place (an empty `out` is replaced)."""
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)


def init_base(
    out: str | os.PathLike[str],
    family: str,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    tokenizer: str = "gpt2",
    data: str = "builtin:kjv",
    seed: int = 0,
) -> Path:
    """Write a randomly initialised causal LM of `family` and its tokenizer into `out`.

    `tokenizer` is a `data.tokenizer` spec (gpt2, bpe:N trained on `data`'s training split, or a
    tokenizer.json); the embedding has exactly its ids and its end-of-document id is the model's
    bos/eos/pad. Dropout is 0 (GPT-2's defaults are 0.1). The feed-forward width defaults to
    4 x hidden (GPT-2) or about 8/3 x hidden, a multiple of 32 (the gated families). The
    directory appears whole or not at all.
    """
    from engram.compress import tokenizer_vocab_size
    from engram.data import DataConfig
    from engram.data.tokenize import data_tokenizer
    from engram.tokenizer import separator_id

    if family not in FAMILIES:
        raise BaseModelError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    if hidden % heads or (hidden // heads) % 2:
        raise BaseModelError(
            f"--hidden {hidden} must split into --heads {heads} heads of even width"
        )
    kv = heads if kv_heads is None else kv_heads
    if heads % kv:
        raise BaseModelError(f"--heads {heads} must be a multiple of --kv-heads {kv}")
    target = Path(out).expanduser()
    check_new_dir(target)
    tok = data_tokenizer(DataConfig(source=data, tokenizer=tokenizer))
    vocab, eot = tokenizer_vocab_size(tok), separator_id(tok)
    special = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(
            f"engram base init needs transformers: pip install 'engram-lm[hf]' ({e})",
            name="transformers",
        ) from e
    if family == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
            n_positions=max_positions, n_inner=intermediate, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **special,
        )  # fmt: skip
    else:
        ffn = intermediate or 32 * max(1, round(8 * hidden / 3 / 32))
        config = AutoConfig.for_model(
            family, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=hidden // heads, max_position_embeddings=max_positions,
            tie_word_embeddings=False, **special,
        )  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.save_pretrained(str(tmp))
        tok.save(str(tmp / TOKENIZER_FILE))
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
