"""Save and load the Engram part of a Hugging Face model: `save_engram` / `load_engram`.

A save directory holds only what Engram adds to a base model the user loads themselves::

    engram_config.json          manifest: EngramConfig, sep_id, table_std, engram-lm version,
                                hash / tokenizer / base-model fingerprints, the files and their
                                sha256, the tables' shapes and data crc32
    engram_dense.safetensors    Engram's dense weights (projections, norms, short conv), keyed by
                                their names under `model.engram` (`layers.<id>.value_proj.weight`)
    table_L<id>.engt            each layer's table, a table file (`engram.store.tablefile`) that
                                carries the hash fingerprint and its own checksums
    lora.safetensors            only for a `peft` model: `get_peft_model_state_dict` ...
    lora_config.json            ... and its adapter config (loading re-applies it)
    base_model.safetensors      only when the base itself trained (full mode): its weights

Design choices:
- Atomic: everything is written into a hidden temporary directory beside the target, fsynced,
  then renamed into place; an existing save is swapped out (renamed aside, the new one renamed
  in, the old one deleted), so a failure at any point before the swap leaves the previous save
  untouched. A crash inside the two-rename swap leaves the previous save at `.<name>.old`, which
  `load_engram`'s error names. Overwriting a non-empty directory that is not an Engram save is
  refused.
- Base-model fingerprint (`base_fingerprint`): sha256 over (a) the architecture (model_type,
  vocab/hidden/intermediate size, layer and head counts), (b) every value of the input
  embedding and (c) 1024 evenly spaced values of every other base parameter, with its canonical
  name and shape. Values are hashed after rounding to bfloat16, so one checkpoint loaded in
  float32 or bfloat16 has one fingerprint (a float16 load may differ: double rounding). It is
  cheap (the embedding plus ~1k values per tensor) and tells apart another checkpoint, another
  init seed or a resized vocabulary; it is not a proof that every weight is identical. Canonical
  names drop `peft`'s wrappers (`.base_layer`, `lora_*`), so a LoRA-wrapped base and the plain
  base agree. When the base trained (full mode) its weights are saved and loaded, so only the
  architecture must match.
- Refusals are `EngramLoadError` (a `ValueError`) with one line naming the directory and the
  problem: another tokenizer or base (fingerprints differ), a missing, corrupt or truncated file
  (sha256 for the safetensors/json files; the table files' header crc and size on every open,
  their data crc32 when loaded into RAM or with `verify=True`), a directory that is not a save.
- Tables are served from RAM (`tables="ram"`: loaded whole into trainable `MemoryRowStore`s)
  or from the table files (`tables="mmap"`): the tier stack of `engram.serving` (mmap ->
  optional hot-row cache -> optional prefetch). With `prefetch=True` a forward pre-hook on the
  backbone, run right after Engram's own (which hashes the call's rows), asks every Engram
  layer's store for its rows, so the table reads of layer 15 overlap blocks 0-14. mmap tables
  are read-only: for generation and evaluation, not training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engram.atomic import default_mode, fsync_dir
from engram.compress import TokenizerCompressor, tokenizer_fingerprint
from engram.config import EngramConfig
from engram.hf.attach import ATTACHMENT, EngramAttachment, add_engram, get_attachment
from engram.store.base import RowStore
from engram.store.cache import CachedRowStore
from engram.store.memory import MemoryRowStore
from engram.store.prefetch import Prefetcher, PrefetchingStore
from engram.store.readers import READERS, open_table_file
from engram.store.stack import close_stack, stack_stats
from engram.store.tablefile import DTYPE_CODES, TableFileError, read_header, write_table
from engram.store.tables import read_tables, table_file_name
from engram.version import __version__

FORMAT = "engram-hf"
FORMAT_VERSION = 1
CONFIG_FILE = "engram_config.json"
DENSE_FILE = "engram_dense.safetensors"
BASE_FILE = "base_model.safetensors"
LORA_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora_config.json"
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
SAMPLE_VALUES = 1024  # values per parameter in the base fingerprint (the embedding: all)
_CHUNK_ROWS = 65536
SERVING_ATTR = "serving"  # `model.engram.serving`: the tier stack of a tables="mmap" load


class EngramLoadError(ValueError):
    """A save directory that cannot be loaded onto this model (one line naming the problem)."""


# ------------------------------------------------------------------------- model structure
def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _causal_lm(model: nn.Module) -> nn.Module:
    """The `transformers` causal LM inside `model` (a `peft` wrapper unwrapped)."""
    return model.get_base_model() if _is_peft(model) else model  # type: ignore[operator]


def _is_adapter(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("lora_") or p == "modules_to_save" for p in parts)


def _canonical(name: str) -> str:
    """A base parameter's name without `peft`'s wrapper segments."""
    return ".".join(p for p in name.split(".") if p not in ("base_layer", "original_module"))


def _base_items(tensors: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """(canonical name, tensor) of the base model: Engram and adapter entries dropped."""
    prefix = ATTACHMENT + "."
    out = {_canonical(n): t for n, t in tensors if not n.startswith(prefix) and not _is_adapter(n)}
    return sorted(out.items())


def _base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return _base_items(_causal_lm(model).named_parameters())  # type: ignore[arg-type]


def _architecture(model: nn.Module) -> dict[str, Any]:
    causal = _causal_lm(model)
    config = causal.config
    arch: dict[str, Any] = {"model_type": getattr(config, "model_type", None)}
    for key in ARCH_FIELDS:
        value = getattr(config, key, None)
        arch[key] = value if isinstance(value, int | str | type(None)) else str(value)
    arch["vocab_size"] = int(causal.get_input_embeddings().weight.shape[0])  # resized or not
    return arch


def _canon_bytes(t: Tensor) -> bytes:
    """Values rounded to bfloat16, as bytes (the fingerprint's dtype-independent view)."""
    return t.detach().reshape(-1).to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes()


def _sample(p: Tensor, k: int = SAMPLE_VALUES) -> Tensor:
    flat = p.detach().reshape(-1)  # (n,)
    n = flat.numel()
    if n <= k:
        return flat
    idx = torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()  # (k,)
    return flat[idx.to(flat.device)]


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of a base model's architecture and weights (see the module docstring).

    Engram's parameters and `peft` adapters are not part of it, so a model gives the same
    fingerprint before and after `add_engram`, with or without LoRA.
    """
    h = hashlib.sha256()
    h.update(json.dumps(_architecture(model), sort_keys=True).encode())
    h.update(_canon_bytes(_causal_lm(model).get_input_embeddings().weight))
    for name, p in _base_parameters(model):
        h.update(f"\n{name}{tuple(p.shape)}".encode())
        h.update(_canon_bytes(_sample(p)))
    return h.hexdigest()


def _describe(arch: Mapping[str, Any], cls: str, dtype: str) -> str:
    return (
        f"{cls} model_type={arch.get('model_type')}, vocab {arch.get('vocab_size')}, hidden "
        f"{arch.get('hidden_size')}, {arch.get('num_hidden_layers')} layers, "
        f"{arch.get('num_attention_heads')} heads, {dtype}"
    )


def _base_info(model: nn.Module, with_weights: bool) -> dict[str, Any]:
    causal = _causal_lm(model)
    dtype = str(causal.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return {
        "class": type(causal).__name__,
        "architecture": _architecture(model),
        "dtype": dtype,
        "fingerprint": base_fingerprint(model) if with_weights else None,
    }


# ------------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _innermost(store: Any) -> Any:
    while getattr(store, "inner", None) is not None:
        store = store.inner
    return store


def _table_source(store: RowStore) -> Any:
    """What `write_table` reads a layer's rows from: the weight tensor, or chunked gathers."""
    weight = getattr(store, "weight", None)
    if isinstance(weight, Tensor):
        return weight.detach()
    inner = _innermost(store)  # read past a cache, which a full scan would only pollute
    read_range = getattr(inner, "read_range", None)
    if callable(read_range):
        return read_range

    def gather(a: int, b: int) -> Tensor:
        with torch.no_grad():
            return inner.gather(torch.arange(a, b)).float().cpu()

    return gather


def _base_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The base model's state (canonical names), each storage once: (tensors, {alias: name})."""
    items = _base_items(_causal_lm(model).state_dict().items())
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in items:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:  # a tied weight (lm_head = embedding): stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _dense_state(att: EngramAttachment) -> dict[str, Tensor]:
    """Engram's dense weights keyed by their names under `model.engram`."""
    table_ids = {id(p) for p in att.table_parameters()}
    return {
        n: p.detach().contiguous().cpu()
        for n, p in att.named_parameters()
        if id(p) not in table_ids and ".store." not in f".{n}."
    }


# ---------------------------------------------------------------------------------- save
def save_engram(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    base_weights: bool | None = None,
    table_dtype: str = "float32",
) -> Path:
    """Write the Engram part of `model` (and its LoRA adapter, if any) to `directory`, atomically.

    `model` is a causal LM with Engram attached (`add_engram`), or a `peft` model around one.
    `tokenizer`, if given, must be the one Engram was attached with (its fingerprint is checked).
    `base_weights`: also save the base model's weights (`base_model.safetensors`); None saves
    them when any base parameter requires grad (full mode), else only the base's fingerprint is
    recorded and `load_engram` demands the same base. `table_dtype`: float32 (exact), bfloat16,
    float16 or int8 table files. Returns the directory.
    """
    if table_dtype not in DTYPE_CODES:
        raise ValueError(f"table_dtype must be one of {list(DTYPE_CODES)}, got {table_dtype!r}")
    att = get_attachment(model)
    wrapped = sorted({n.rsplit(".", 2)[0] for n, _ in att.named_parameters() if _is_adapter(n)})
    if wrapped or any(".base_layer." in n for n, _ in att.named_parameters()):
        raise ValueError(
            f"peft wrapped Engram's own modules ({wrapped[:3]}...): exclude them from the LoRA "
            "config (engram.hf.prepare_training(model, 'lora', lora=...) does)"
        )
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != att.compressor.fingerprint:
        raise ValueError(
            "the tokenizer given to save_engram is not the one Engram was attached with "
            f"(fingerprint {tokenizer_fingerprint(tokenizer)[:16]}, expected "
            f"{att.compressor.fingerprint[:16]})"
        )
    base_params = _base_parameters(model)
    if base_weights is None:
        base_weights = any(p.requires_grad for _, p in base_params)
    lora = _is_peft(model)
    final = Path(directory)
    _check_target(final)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        manifest = _write_save(tmp, model, att, bool(base_weights), lora, table_dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync_file(f)
        fsync_dir(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_target(final: Path) -> None:
    if final.exists() and not final.is_dir():
        raise ValueError(f"cannot save Engram to {final}: it is a file, not a directory")
    if final.is_dir() and any(final.iterdir()) and not (final / CONFIG_FILE).is_file():
        raise ValueError(
            f"cannot save Engram to {final}: it is a non-empty directory without {CONFIG_FILE} "
            "(not an Engram save); choose an empty or new directory"
        )


def _swap_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # swap: the old save is never deleted before the new one is in place
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # put the previous save back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_save(
    tmp: Path, model: nn.Module, att: EngramAttachment, base_weights: bool, lora: bool,
    table_dtype: str,
) -> dict[str, Any]:  # fmt: skip
    """Write every file of a save into `tmp`; returns the manifest."""
    meta = {"format": FORMAT, "engram_lm_version": __version__}
    files: dict[str, str] = {}
    save_file(_dense_state(att), str(tmp / DENSE_FILE), metadata=meta)
    files[DENSE_FILE] = _sha256(tmp / DENSE_FILE)

    base = _base_info(model, with_weights=not base_weights)
    base["weights"] = "saved" if base_weights else "frozen"
    if base_weights:
        tensors, aliases = _base_state(model)
        save_file(tensors, str(tmp / BASE_FILE), metadata=meta)
        files[BASE_FILE] = _sha256(tmp / BASE_FILE)
        base["aliases"] = aliases

    lora_info = None
    if lora:
        lora_info = _write_lora(tmp, model, meta)
        files.update({f: _sha256(tmp / f) for f in (LORA_FILE, LORA_CONFIG_FILE)})

    fingerprint = att.fingerprint()
    tables: dict[str, Any] = {}
    for lid, layer in att.engram_layers().items():
        name = table_file_name(lid)
        sizes = list(layer.table_sizes)
        h = write_table(
            tmp / name, _table_source(layer.store), dtype=table_dtype, fingerprint=fingerprint,
            layer_id=lid, num_rows=layer.store.num_rows, dim=layer.store.dim,
            chunk_rows=_CHUNK_ROWS,
            meta={"source": FORMAT, "sub_table_sizes": sizes, "engram_config": att.cfg.to_dict(),
                  "compressor_fingerprint": att.compressor.fingerprint,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )  # fmt: skip
        tables[str(lid)] = {
            "file": name, "num_rows": h.num_rows, "dim": h.dim, "dtype": h.dtype,
            "data_crc": f"{h.data_crc:08x}",
        }  # fmt: skip
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engram_lm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engram": att.cfg.to_dict(),
        "sep_id": att.sep_id,
        "table_std": _table_std(att),
        "hash_fingerprint": fingerprint,
        "tokenizer_fingerprint": att.compressor.fingerprint,
        "mode": "full" if base_weights else ("lora" if lora else "adapter"),
        "base": base,
        "lora": lora_info,
        "tables": tables,
        "files": files,
    }


def _table_std(att: EngramAttachment) -> float:
    """The init std of the tables (recorded for a store rebuilt later; 1.0 if unknown)."""
    for layer in att.engram_layers().values():
        std = getattr(_innermost(layer.store), "std", None)
        if isinstance(std, int | float):
            return float(std)
    return 1.0


def _write_lora(tmp: Path, model: nn.Module, meta: dict[str, str]) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    adapter = getattr(model, "active_adapter", "default")
    if not isinstance(adapter, str):
        raise ValueError(f"save_engram saves one peft adapter; this model has active {adapter}")
    # save_embedding_layers=False: a resized embedding is part of the base (its fingerprint),
    # and peft's "auto" may look the base up on the Hub
    raw = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    state = {k: v.detach().contiguous().cpu() for k, v in raw.items()}
    save_file(state, str(tmp / LORA_FILE), metadata=meta)
    config = model.peft_config[adapter].to_dict()  # type: ignore[index, operator]
    (tmp / LORA_CONFIG_FILE).write_text(
        json.dumps(config, indent=1, sort_keys=True, default=_json_default), encoding="utf-8"
    )
    return {"adapter": adapter, "file": LORA_FILE, "config_file": LORA_CONFIG_FILE}


# ---------------------------------------------------------------------------------- load
@dataclass
class EngramServing:
    """The tier stack of a `tables="mmap"` load (`model.engram.serving`); `close()` when done."""

    stores: dict[int, RowStore] = field(default_factory=dict)
    files: dict[int, Path] = field(default_factory=dict)
    prefetcher: Prefetcher | None = None

    def stats(self) -> dict[str, Any]:
        """Per layer: the hot-row cache's and the prefetcher's statistics (JSON-able)."""
        return stack_stats(self.stores)

    def close(self) -> None:
        """Stop the prefetch thread and close the table files (idempotent)."""
        close_stack(self.stores, self.prefetcher)


def close_engram(model: nn.Module) -> None:
    """Release what `load_engram(..., tables="mmap")` opened (prefetch thread, table files)."""
    serving = getattr(get_attachment(model), SERVING_ATTR, None)
    if isinstance(serving, EngramServing):
        serving.close()


def _fail(directory: Path, problem: str) -> EngramLoadError:
    return EngramLoadError(f"engram save {directory}: {problem}")


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest (`engram_config.json`) of a save directory, validated; `EngramLoadError` else."""
    d = Path(directory)
    if not d.exists():
        old = d.parent / f".{d.name}.old"
        hint = f" (an interrupted save left the previous one at {old})" if old.is_dir() else ""
        raise _fail(d, f"does not exist{hint}")
    if not d.is_dir():
        raise _fail(d, "is a file, not a save directory")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise _fail(d, f"is not an Engram save: no {CONFIG_FILE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(d, f"{CONFIG_FILE} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(d, f"{CONFIG_FILE} is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(
            d, f"format version {manifest.get('format_version')!r}; this engram-lm "
            f"({__version__}) reads version {FORMAT_VERSION}",
        )  # fmt: skip
    needed = ("engram", "hash_fingerprint", "tokenizer_fingerprint", "base", "tables", "files")
    missing = [k for k in needed if k not in manifest]
    if missing:
        raise _fail(d, f"{CONFIG_FILE} lacks {missing}")
    for name, digest in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise _fail(d, f"{name} is missing")
        if _sha256(f) != digest:
            raise _fail(d, f"{name} is corrupt or truncated (sha256 differs from the manifest's)")
    return manifest


def _check_tokenizer(d: Path, manifest: Mapping[str, Any], tokenizer: Any) -> None:
    got = tokenizer_fingerprint(tokenizer)
    want = manifest["tokenizer_fingerprint"]
    if got != want:
        raise _fail(
            d, f"Engram was trained with tokenizer {want[:16]}, this tokenizer is {got[:16]} "
            f"({type(tokenizer).__name__}): its n-grams would hit other rows",
        )  # fmt: skip


def _check_base(d: Path, manifest: Mapping[str, Any], model: nn.Module, weights: bool) -> None:
    saved = manifest["base"]
    info = _base_info(model, with_weights=weights)
    here = _describe(info["architecture"], info["class"], info["dtype"])
    there = _describe(saved["architecture"], saved["class"], saved["dtype"])
    if info["architecture"] != saved["architecture"]:
        raise _fail(d, f"the Engram weights were trained on a {there}; this model is a {here}")
    if weights and info["fingerprint"] != saved["fingerprint"]:
        raise _fail(
            d, f"the Engram weights were trained on base {saved['fingerprint'][:16]} ({there}), "
            f"this model is {info['fingerprint'][:16]} ({here}): another checkpoint, seed or "
            "fine-tune of the base (pass check_base=False to load anyway)",
        )  # fmt: skip


def _table_files(d: Path, manifest: Mapping[str, Any], cfg: EngramConfig) -> dict[int, Path]:
    tables = manifest["tables"]
    want = sorted(cfg.layer_ids)
    if sorted(int(k) for k in tables) != want:
        raise _fail(d, f"the manifest lists tables {sorted(tables)}, expected layers {want}")
    files: dict[int, Path] = {}
    for lid in cfg.layer_ids:
        rec = tables[str(lid)]
        f = d / rec["file"]
        if not f.is_file():
            raise _fail(d, f"table file {rec['file']} is missing")
        try:
            h = read_header(f, expected_fingerprint=manifest["hash_fingerprint"])
        except TableFileError as e:
            raise _fail(d, str(e)) from None
        found = (h.layer_id, h.num_rows, h.dim, f"{h.data_crc:08x}")
        if found != (lid, rec["num_rows"], rec["dim"], rec["data_crc"]):
            raise _fail(
                d, f"{rec['file']} holds layer {h.layer_id} ({h.num_rows}, {h.dim}) crc "
                f"{found[3]}, the manifest says layer {lid} ({rec['num_rows']}, {rec['dim']}) "
                f"crc {rec['data_crc']}: a table file from another save",
            )  # fmt: skip
        files[lid] = f
    return files


def _ram_stores(
    d: Path, files: Mapping[int, Path], fingerprint: str, std: float
) -> dict[int, RowStore]:
    try:
        tables = read_tables(files, expected_fingerprint=fingerprint, verify=True)
    except TableFileError as e:
        raise _fail(d, str(e)) from None
    stores: dict[int, RowStore] = {}
    for lid, table in tables.items():  # (num_rows, dim) float32
        s = MemoryRowStore(table.shape[0], table.shape[1], std=std, check_bounds=False)
        with torch.no_grad():
            s.weight.copy_(table)
        stores[lid] = s
    return stores


def _mmap_stores(
    d: Path, files: Mapping[int, Path], fingerprint: str, *, cache_rows: int, prefetch: bool,
    verify: bool, device: torch.device, reader: str,
) -> tuple[dict[int, RowStore], Prefetcher | None]:  # fmt: skip
    """The tier stack of `engram.serving.load_served`, per layer: file (mmap or pread, as
    `reader` says) -> cache -> prefetch."""
    prefetcher = Prefetcher(max_pending=2 * len(files)) if prefetch else None
    stores: dict[int, RowStore] = {}
    try:
        for lid, f in files.items():
            store: RowStore = open_table_file(f, reader, fingerprint=fingerprint, verify=verify)
            if cache_rows:
                store = CachedRowStore(store, capacity_rows=cache_rows, check_bounds=False)
            if prefetcher is not None:
                on_gpu = device if device.type == "cuda" else None
                store = PrefetchingStore(store, prefetcher, device=on_gpu)
            stores[lid] = store
    except TableFileError as e:
        EngramServing(stores, dict(files), prefetcher).close()
        raise _fail(d, str(e)) from None
    except BaseException:
        EngramServing(stores, dict(files), prefetcher).close()
        raise
    return stores, prefetcher


def _install_prefetch(model: nn.Module, att: EngramAttachment) -> None:
    """After Engram's backbone pre-hook has the call's rows, ask each layer's store for them."""
    from engram.hf.families import find_backbone

    def prefetch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = att._call
        if call is None:
            return
        for index, lid in enumerate(att.cfg.layer_ids):
            att.layers[str(lid)].prefetch(call.rows[index], call.live)  # type: ignore[operator]

    find_backbone(_causal_lm(model)).module.register_forward_pre_hook(prefetch, with_kwargs=True)


def _load_base_weights(d: Path, manifest: Mapping[str, Any], model: nn.Module) -> None:
    try:
        tensors = load_file(str(d / BASE_FILE))
    except (SafetensorError, OSError) as e:
        raise _fail(d, f"{BASE_FILE} cannot be read ({e})") from None
    for alias, name in manifest["base"].get("aliases", {}).items():
        tensors[alias] = tensors[name]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise _fail(
            d, f"{BASE_FILE} does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}",
        )  # fmt: skip


def _load_dense(d: Path, att: EngramAttachment) -> None:
    try:
        saved = load_file(str(d / DENSE_FILE))
    except (SafetensorError, OSError) as e:
        raise _fail(d, f"{DENSE_FILE} cannot be read ({e})") from None
    params = dict(att.named_parameters())
    want = set(_dense_state(att))
    if set(saved) != want:
        raise _fail(
            d, f"{DENSE_FILE} holds {sorted(set(saved) - want)[:5]} not in this Engram and lacks "
            f"{sorted(want - set(saved))[:5]} (another engram-lm version?)",
        )  # fmt: skip
    with torch.no_grad():
        for name, t in saved.items():
            p = params[name]
            if p.shape != t.shape:
                raise _fail(
                    d, f"{DENSE_FILE}: {name} has shape {tuple(t.shape)}, this Engram's is "
                    f"{tuple(p.shape)}",
                )  # fmt: skip
            p.copy_(t)


def _apply_lora(d: Path, manifest: Mapping[str, Any], model: nn.Module) -> nn.Module:
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    info = manifest["lora"]
    try:
        raw = json.loads((d / info["config_file"]).read_text(encoding="utf-8"))
        config = PeftConfig.from_peft_type(**raw)
        state = load_file(str(d / info["file"]))
    except (json.JSONDecodeError, SafetensorError, OSError, TypeError, ValueError) as e:
        raise _fail(d, f"the LoRA adapter cannot be read ({type(e).__name__}: {e})") from None
    wrapped = get_peft_model(model, config, adapter_name=info["adapter"])
    result = set_peft_model_state_dict(wrapped, state, adapter_name=info["adapter"])
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise _fail(d, f"{info['file']} holds LoRA weights this model has no place for: {bad[:5]}")
    for p in get_attachment(wrapped).parameters():  # peft froze them; trainable as when saved
        p.requires_grad_(True)
    return wrapped


def load_engram(
    model: nn.Module,
    directory: str | os.PathLike[str],
    tokenizer: Any,
    *,
    tables: str = "ram",
    cache_rows: int = 0,
    prefetch: bool = False,
    verify: bool = False,
    check_base: bool = True,
    reader: str = "auto",
) -> nn.Module:
    """Attach the Engram saved in `directory` to `model` (the same base, freshly loaded).

    `tokenizer` must be the one Engram was trained with; `model` the same base model (same
    fingerprint) unless the save holds the base's own weights (full mode), which are loaded into
    it. `tables`: "ram" loads the tables into memory (trainable, data crc checked); "mmap" serves
    rows from the table files through a hot-row cache of `cache_rows` rows per layer (0 = none)
    and, with `prefetch`, a background prefetch thread (`close_engram(model)` releases them);
    `reader` ("auto", "mmap" or "pread") reads the files as `engram.serving.TierConfig.reader`
    does (`engram.store.readers`; auto: pread for a file larger than half the RAM).
    `verify` checks the table files' data crc in mmap mode too (a full read). Returns the model
    to use: `model` itself, or a `peft` model around it when the save holds a LoRA adapter.
    What trains afterwards is what trained when it was saved: Engram (ram tables), plus the
    LoRA adapter or the base in those modes. Raises `EngramLoadError` (a `ValueError`) naming
    the problem; every check of the files, tokenizer and base runs before anything is attached.
    """
    d = Path(directory)
    if tables not in ("ram", "mmap"):
        raise ValueError(f"tables must be 'ram' or 'mmap', got {tables!r}")
    if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 0:
        raise ValueError(f"cache_rows must be an int >= 0, got {cache_rows!r}")
    if tables == "ram" and (cache_rows or prefetch or reader != "auto"):
        raise ValueError("cache_rows, prefetch and reader apply to tables='mmap' only")
    if reader not in READERS:
        raise ValueError(f"reader must be one of {list(READERS)}, got {reader!r}")
    if _is_peft(model):
        raise ValueError(
            f"load_engram takes the plain base model, got a peft {type(model).__name__}: the "
            "saved LoRA adapter (if any) is applied by load_engram itself"
        )
    if isinstance(getattr(model, ATTACHMENT, None), EngramAttachment):
        raise ValueError(f"{type(model).__name__} already has Engram attached")
    manifest = read_manifest(d)
    try:
        cfg = EngramConfig.from_dict(dict(manifest["engram"]))
    except (TypeError, ValueError) as e:
        raise _fail(d, f"its EngramConfig is invalid ({e})") from None
    _check_tokenizer(d, manifest, tokenizer)
    base_saved = manifest["base"].get("weights") == "saved"
    _check_base(d, manifest, model, weights=check_base and not base_saved)
    files = _table_files(d, manifest, cfg)
    fingerprint = manifest["hash_fingerprint"]
    emb = model.get_input_embeddings().weight
    serving = None
    table_std = float(manifest.get("table_std", 1.0))
    if tables == "ram":
        stores = _ram_stores(d, files, fingerprint, table_std)
    else:
        stores, prefetcher = _mmap_stores(
            d, files, fingerprint, cache_rows=cache_rows, prefetch=prefetch, verify=verify,
            device=emb.device, reader=reader,
        )  # fmt: skip
        serving = EngramServing(stores, dict(files), prefetcher)
    try:
        compressor = TokenizerCompressor.from_tokenizer(tokenizer)
        if base_saved:
            _load_base_weights(d, manifest, model)
        add_engram(
            model, cfg, tokenizer, train_base=base_saved, stores=stores,
            table_std=table_std, compressor=compressor,
            sep_id=manifest.get("sep_id"),
        )  # fmt: skip
    except BaseException:
        if serving is not None:
            serving.close()
        raise
    att = get_attachment(model)
    att.sep_id = manifest.get("sep_id")  # None too: add_engram would default it to the eos
    if att.fingerprint() != fingerprint:
        raise _fail(
            d, f"Engram here hashes as {att.fingerprint()[:16]}, the save as {fingerprint[:16]} "
            f"(saved by engram-lm {manifest.get('engram_lm_version')}, this is {__version__})",
        )  # fmt: skip
    _load_dense(d, att)
    if serving is not None:
        setattr(att, SERVING_ATTR, serving)
        if serving.prefetcher is not None:
            _install_prefetch(model, att)
    if manifest.get("lora"):
        return _apply_lora(d, manifest, model)
    return model
