"""Checkpoints: safetensors for tensors, one json for everything else, written atomically.

Layout of one checkpoint directory (``<run>/checkpoints/step-000300/``)::

    model.safetensors      model state (tables included; a tied weight stored once)
    optimizer.safetensors  every optimizer-state tensor, keyed ``<optimizer>/<index>/<name>``
    tables/                only for tables trained on disk (not in model.safetensors): per layer
                           a chain (`engram.store.tablechain`): a base of three table files
                           (``L<id>.{weight,exp_avg,exp_avg_sq}.engt`` in the checkpoint that
                           wrote it, ``L<id>.base.<part>.engt`` hard links in later ones) then
                           ``L<id>.delta-NNNN.engd`` files (rows written since the previous
                           checkpoint), listed in ``L<id>.chain.json``; each with its own crc
    state.json             format version, step, the run config, hash-configuration fingerprint,
                           optimizer param-group settings, RNG states, sha256 of the files,
                           per disk table its chain and what this checkpoint wrote for it

``<run>/checkpoints/LATEST`` names the newest complete one, and ``checkpoints.jsonl`` there gets
one line per committed checkpoint: its step, seconds and bytes written (model, optimizer, each
disk table: kind, rows and bytes).

Design choices:
- Atomic: a checkpoint is written into a hidden temporary directory beside its final name, every
  file fsynced, then renamed into place; ``LATEST`` is replaced (temp file + ``os.replace``) only
  after that. A crash at any point leaves the previous checkpoint and pointer intact.
- Integrity: ``state.json`` records the sha256 of both tensor files; loading verifies them, so a
  truncated or corrupted file is refused with a message naming it instead of loading garbage.
- The hash configuration's fingerprint is stored; a checkpoint whose tables were addressed by a
  different hashing (other seed, primes, tokenizer compression...) is refused before any weight is
  touched, because its rows would silently mean different n-grams.
- Tables trained on disk are checkpointed incrementally (see `engram.store.trainable`): the
  store is told (`mark_committed`) only after the rename, so a failed checkpoint's rows go into
  the next one. A reader that needs a table as one file (serving, export, evaluation) gets it
  from `table_file`, which writes the chain's result beside it on first use.
- Optimizer state is flattened into named tensors (safetensors holds tensors only); the
  non-tensor rest (param-group hyper-parameters) goes into the json. Loading rebuilds the
  ``state_dict`` that ``torch.optim.Optimizer.load_state_dict`` expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from engram.atomic import atomic_write_text, default_mode

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "LATEST"
CHECKPOINT_LOG = "checkpoints.jsonl"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TABLES_DIR = "tables"
# A table tensor's key ends with this (`blocks.<i>.engram.store.weight`).
EXTERNAL_TABLE_SUFFIX = ".engram.store.weight"
# The key of Engram layer `layer_id`'s in-RAM table in model.safetensors.
TABLE_KEY = "blocks.{layer_id}" + EXTERNAL_TABLE_SUFFIX


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[list, list]:
    """`load_state_dict(strict=False)` that accepts a tied weight stored under one name only.

    Returns (missing, unexpected) like `load_state_dict`, minus the tied aliases of loaded keys.
    """
    result = model.load_state_dict(dict(tensors), strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in tensors if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded)]
    return missing, list(result.unexpected_keys)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or made for another configuration."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` read: the directory and its json state."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]


# ------------------------------------------------------------------------------------ helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cause(e: OSError) -> str:
    """`[Errno 28] No space left on device`: an OSError without the file name repeated."""
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None and e.strerror else str(e)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when present) global RNG states, json-ready."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_s = state["numpy"]
    np.random.set_state((np_s[0], np.asarray(np_s[1], dtype=np.uint32), *np_s[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _flatten_optimizers(
    optim_state: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{name: optimizer.state_dict()} -> (named tensors, json-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, sd in optim_state.items():
        scalars: dict[str, dict[str, Any]] = {}
        for idx, per_param in sd["state"].items():
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{idx}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def _unflatten_optimizers(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in meta.items():
        state: dict[int, dict[str, Any]] = {}
        for idx, scalars in info["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        out[name] = {"state": state, "param_groups": info["param_groups"]}
    for key, value in tensors.items():
        name, idx, field = key.split("/", 2)
        if name not in out:
            raise CheckpointError(f"optimizer tensor {key!r} belongs to no optimizer in the json")
        out[name]["state"].setdefault(int(idx), {})[field] = value
    return out


# ---------------------------------------------------------------------------------- save/load
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir(ckpt_root: str | os.PathLike[str], step: int) -> Path:
    """A fresh hidden directory beside checkpoint `step`'s final name, to be filled and renamed."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{checkpoint_name(step)}.", suffix=".tmp", dir=root))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def save_checkpoint(
    ckpt_root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer_state: Mapping[str, Any] | None,
    state: Mapping[str, Any],
    keep: int = 0,
    tables: Mapping[int, Any] | None = None,
    staging: Path | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write checkpoint `step` under `ckpt_root` atomically and point LATEST at it.

    `state` is json-able run information (config, fingerprints, metrics...); the step, RNG states,
    file hashes and format version are added here. `tables` ({layer_id: DiskTrainedStore}) are
    tables trained on disk: each copies its files into the checkpoint's `tables/` before the
    checkpoint is renamed into place. `keep` > 0 deletes all but the newest `keep` checkpoints
    afterwards. Returns the checkpoint directory.

    `staging` is a directory from `staging_dir` that other writers (the ranks of a distributed
    run, each with its table shard) have already filled; `extra_files` ({relative path: sha256})
    lists what they wrote, so loading verifies those files too.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = staging if staging is not None else staging_dir(root, step)
    t0 = time.perf_counter()
    try:
        save_model(model, str(tmp / MODEL_FILE))
        files = [MODEL_FILE]
        meta: dict[str, Any] = {}
        if optimizer_state is not None:
            tensors, meta = _flatten_optimizers(optimizer_state)
            save_file(tensors, str(tmp / OPTIM_FILE))
            files.append(OPTIM_FILE)
        full = dict(state)
        if tables:
            from engram.store.tablechain import manifest_file

            full["tables"] = {str(lid): t.save(tmp / TABLES_DIR) for lid, t in tables.items()}
            files += [f"{TABLES_DIR}/{manifest_file(int(lid))}" for lid in tables]
        full.update(
            format_version=FORMAT_VERSION,
            step=int(step),
            optimizer=meta,
            rng=rng_state(),
            sha256={**{f: _sha256(tmp / f) for f in files}, **(extra_files or {})},
        )
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=1), encoding="utf-8")
        for f in [*files, STATE_FILE]:
            _fsync(tmp / f)
        if final.exists():  # re-saving the same step: swap, never leave a gap without one
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for lid, t in (tables or {}).items():  # their next save builds on this checkpoint
            t.mark_committed(final / TABLES_DIR, full["tables"][str(lid)])
    except OSError as e:  # a full disk, a read-only or vanished directory...
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_cause(e)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        atomic_write_text(root / LATEST, final.name + "\n")
    except OSError as e:  # the checkpoint is complete; LATEST still names the previous one
        raise CheckpointError(f"cannot write checkpoint {root / LATEST}: {_cause(e)}") from e
    _log_checkpoint(root, final, full, time.perf_counter() - t0)
    if keep > 0:
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for p in steps[:-keep]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


def _log_checkpoint(root: Path, final: Path, state: Mapping[str, Any], seconds: float) -> None:
    """One line in ``checkpoints.jsonl`` (and the log) on what checkpoint `final` wrote."""
    sizes = {
        f: (final / f).stat().st_size for f in (MODEL_FILE, OPTIM_FILE) if (final / f).is_file()
    }
    tables = {lid: rec.get("checkpoint", {}) for lid, rec in state.get("tables", {}).items()}
    total = sum(sizes.values()) + sum(int(t.get("bytes_written", 0)) for t in tables.values())
    line = {
        "step": int(state["step"]), "checkpoint": final.name, "seconds": round(seconds, 6),
        "bytes_written": total, "files": sizes, "tables": tables,
    }  # fmt: skip
    logger.info(
        "engram: checkpoint %s: %d bytes in %.3f s%s", final.name, total, seconds,
        "".join(
            f"; table L{lid} {t.get('kind')} {t.get('rows_written')} rows "
            f"{t.get('bytes_written')} bytes" for lid, t in tables.items()
        ),
    )  # fmt: skip
    try:
        with open(root / CHECKPOINT_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as e:  # the checkpoint itself is committed; the report is best effort
        logger.warning("engram: warning: cannot append to %s: %s", root / CHECKPOINT_LOG, _cause(e))


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from a run dir, a checkpoints dir (via LATEST) or the dir itself."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    for candidate in (p, p / "checkpoints"):
        if (candidate / STATE_FILE).is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            name = latest.read_text(encoding="utf-8").strip()
            target = candidate / name
            if not (target / STATE_FILE).is_file():
                raise CheckpointError(
                    f"{latest} points at {name!r}, which is not a complete checkpoint"
                )
            return target
    raise CheckpointError(
        f"no checkpoint found at {str(p)!r}: expected a directory with {STATE_FILE}, "
        f"or a run/checkpoints directory with a {LATEST} file"
    )


def remove_stale_temporaries(ckpt_root: str | os.PathLike[str]) -> list[Path]:
    """Delete half-written checkpoint directories a killed writer left behind; returns them."""
    stale = [p for p in Path(ckpt_root).glob(".step-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def find_latest(ckpt_root: str | os.PathLike[str], fallback: bool = False) -> Path | None:
    """The checkpoint LATEST points at under `ckpt_root`, or None if there is none yet.

    With `fallback`, a missing or corrupt LATEST (one that names no complete checkpoint) is not
    an error while a checkpoint survives: the newest one whose files verify (see
    `read_checkpoint`) is returned instead, with a warning naming it. A checkpoint directory
    that exists but none verifies is a `CheckpointError` listing them.
    """
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not fallback:
        return resolve_checkpoint(root) if pointer.is_file() else None
    try:
        if pointer.is_file():
            return resolve_checkpoint(root)
        problem = "is missing"
    except (CheckpointError, OSError, UnicodeDecodeError) as e:
        problem = f"is unusable ({' '.join(str(e).split())})"
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if not candidates:
        return None
    damaged = []
    for path in candidates:
        try:
            read_checkpoint(path)
        except (CheckpointError, OSError, ValueError) as e:
            damaged.append(f"{path.name} ({' '.join(str(e).split())[:200]})")
            continue
        logger.warning(
            "engram: warning: %s %s; resuming from the newest intact checkpoint %s",
            pointer, problem, path,
        )  # fmt: skip
        return path
    raise CheckpointError(
        f"{pointer} {problem} and no checkpoint under {root} is intact: {'; '.join(damaged)}"
    )


def read_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Read and validate a checkpoint's json (and, with `verify`, its files' sha256)."""
    ckpt = resolve_checkpoint(path)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable or corrupt: {e}") from e
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt} has checkpoint format version {version!r}; this engram reads {FORMAT_VERSION}"
        )
    if verify:
        from engram.store.tablechain import check_chain
        from engram.store.tablefile import TableFileError, verify_table

        fingerprint = state.get("hash_fingerprint")
        for record in state.get("tables", {}).values():
            try:
                if "chain" in record:
                    check_chain(
                        ckpt / TABLES_DIR, record["chain"], expected_fingerprint=fingerprint
                    )
                else:  # the full-copy format: three complete files
                    for name in record["files"].values():
                        verify_table(ckpt / TABLES_DIR / name)
            except (OSError, TableFileError) as e:
                raise CheckpointError(f"checkpoint table file is damaged: {e}") from e
        for name, digest in state.get("sha256", {}).items():
            f = ckpt / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {f} is missing")
            if _sha256(f) != digest:
                raise CheckpointError(
                    f"checkpoint file {f} is corrupt or truncated (sha256 does not match the "
                    f"one recorded in {STATE_FILE})"
                )
    return Checkpoint(ckpt, state)


def table_file(ckpt: Checkpoint, layer_id: int, part: str = "weight") -> Path:
    """One complete table file of layer `layer_id`'s disk-trained table in checkpoint `ckpt`.

    A checkpoint holding a full base returns its file; one holding a delta chain writes the
    chain's result as ``tables/L<id>.<part>.engt`` on first use (atomically; later calls find
    it) and returns that. `part` is weight, exp_avg or exp_avg_sq.
    """
    from engram.store.tablechain import PARTS, materialise, part_file
    from engram.store.tablefile import TableFileError, read_header

    record = ckpt.state.get("tables", {}).get(str(layer_id))
    if record is None:
        raise CheckpointError(
            f"checkpoint {ckpt.path} has no table trained on disk for layer {layer_id} "
            f"(it has {sorted(ckpt.state.get('tables', {}))})"
        )
    if part not in PARTS:
        raise ValueError(f"unknown table part {part!r}; expected one of {PARTS}")
    tables = ckpt.path / TABLES_DIR
    chain = record.get("chain")
    if chain is None:
        return tables / record["files"][part]
    if len(chain) == 1:
        return tables / chain[0]["files"][part]
    path = tables / part_file(int(layer_id), part)
    fingerprint = ckpt.state.get("hash_fingerprint")
    try:
        if path.is_file():
            read_header(path, expected_fingerprint=fingerprint)
            return path
        materialise(tables, chain, part, path, expected_fingerprint=fingerprint)
    except TableFileError as e:
        raise CheckpointError(f"checkpoint table of layer {layer_id} is damaged: {e}") from e
    except OSError as e:
        raise CheckpointError(
            f"cannot write {path} (the table checkpoint {ckpt.path} holds as a base plus "
            f"{len(chain) - 1} delta file(s)): {_cause(e)}"
        ) from e
    return path


def check_fingerprint(ckpt: Checkpoint, expected: str | None) -> None:
    """Refuse a checkpoint whose hash-configuration fingerprint differs from `expected`."""
    stored = ckpt.state.get("hash_fingerprint")
    if stored != expected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained with hash configuration "
            f"{(stored or 'none (no Engram)')[:16]}, but this model's is "
            f"{(expected or 'none (no Engram)')[:16]}: its table rows would address different "
            "n-grams; use the checkpoint's own config (engram_cfg, tokenizer) to load it"
        )


def load_model_weights(
    ckpt: Checkpoint, model: nn.Module, extra: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Load the checkpoint's model tensors into `model` (strict: every key must match).

    The one exception: a table the model serves from an outside store (an Engram layer whose
    store is not a module, e.g. an mmap'd table file) is skipped and never read into memory.
    `extra` adds tensors kept outside model.safetensors (tables a distributed run saved as
    shards, assembled by the caller).
    """
    path = ckpt.path / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        own = set(model.state_dict())
        external = {k for k in keys if k not in own and k.endswith(EXTERNAL_TABLE_SUFFIX)}
        if not external and not extra:
            missing, unexpected = load_model(model, str(path), strict=False)
        else:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in keys if k not in external}
            missing, unexpected = load_model_state(model, {**tensors, **(extra or {})})
    except Exception as e:  # safetensors raises several kinds on damaged/mismatched files
        raise CheckpointError(f"cannot load {path} into the model: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_optimizer_state(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The `{name: state_dict}` saved with the checkpoint, or None if it has none."""
    f = ckpt.path / OPTIM_FILE
    if not f.is_file():
        return None
    return _unflatten_optimizers(load_file(str(f)), ckpt.state.get("optimizer", {}))


# ------------------------------------------------------------- sharded tables (the read side)
# A distributed run saves each table as per-rank shards (written by `engram.parallel.tables`);
# reading them needs no process group, so a single process loads them from here.
SHARDED_KEY = "sharded_tables"
TABLE_PARTS = ("weight", "exp_avg", "exp_avg_sq")  # a table and its two Adam moments


class TableRows:
    """Rows of one layer's trained table and Adam moments, from any kind of checkpoint."""

    def __init__(self, ckpt: Checkpoint, layer_id: int, layer_ids: tuple[int, ...]) -> None:
        self.ckpt, self.layer_id = ckpt, int(layer_id)
        sharded = ckpt.state.get(SHARDED_KEY, {})
        if str(layer_id) in sharded:
            rec = sharded[str(layer_id)]
            self.num_rows, self.dim, self.step = rec["num_rows"], rec["dim"], int(rec["step"])
            self._shards = [(ckpt.path / s["file"], s["start"], s["stop"]) for s in rec["shards"]]
            covered = 0
            for _, start, stop in self._shards:
                if start != covered:
                    raise CheckpointError(
                        f"{ckpt.path}: shards of layer {layer_id} leave rows [{covered}, {start}) "
                        "uncovered"
                    )
                covered = stop
            if covered != self.num_rows:
                raise CheckpointError(
                    f"{ckpt.path}: shards of layer {layer_id} cover {covered} of {self.num_rows} rows"
                )
            return
        if ckpt.state.get("tables"):
            raise CheckpointError(
                f"{ckpt.path} holds tables trained on disk (train.table_store='mmap'); "
                "continue it in one process"
            )
        self._shards = []
        key = TABLE_KEY.format(layer_id=layer_id)
        with safe_open(str(ckpt.path / MODEL_FILE), framework="pt") as f:
            if key not in set(f.keys()):
                raise CheckpointError(f"{ckpt.path / MODEL_FILE} has no table {key!r}")
            self.num_rows, self.dim = f.get_slice(key).get_shape()
        # SparseAdam's state is keyed by the table's index among the table parameters.
        self._index = str(list(layer_ids).index(layer_id))
        table = ckpt.state.get("optimizer", {}).get("table", {})
        self.step = int(table.get("scalars", {}).get(self._index, {}).get("step", 0))

    def read(self, part: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of `part` (weight, exp_avg or exp_avg_sq) -> (stop - start, dim)."""
        if part not in TABLE_PARTS:
            raise ValueError(f"unknown table part {part!r}; expected one of {TABLE_PARTS}")
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside [0, {self.num_rows})")
        if self._shards:
            pieces = []
            for path, s0, s1 in self._shards:
                lo, hi = max(start, s0), min(stop, s1)
                if lo < hi:
                    with safe_open(str(path), framework="pt") as f:
                        pieces.append(f.get_slice(part)[lo - s0 : hi - s0])
            return torch.cat(pieces) if pieces else torch.zeros(0, self.dim)
        if part == "weight":
            return self._slice(MODEL_FILE, TABLE_KEY.format(layer_id=self.layer_id), start, stop)
        key = f"table/{self._index}/{part}"
        if self.step == 0:  # never stepped: SparseAdam has not created its moments yet
            return torch.zeros(stop - start, self.dim)
        return self._slice(OPTIM_FILE, key, start, stop)

    def _slice(self, file: str, key: str, start: int, stop: int) -> Tensor:
        with safe_open(str(self.ckpt.path / file), framework="pt") as f:
            if key not in set(f.keys()):
                raise CheckpointError(f"{self.ckpt.path / file} has no tensor {key!r}")
            return f.get_slice(key)[start:stop]


def assembled_tables(ckpt: Checkpoint, wanted: Collection[str]) -> dict[str, Tensor]:
    """{state-dict key: full table} of a distributed checkpoint's sharded tables, for the keys
    in `wanted` (a model's state-dict keys: tables it serves from another store are not read),
    and of tables trained on disk that the model holds in RAM (read from their table file)."""
    from engram.store.tablefile import read_table

    out = {}
    for lid, rec in ckpt.state.get(SHARDED_KEY, {}).items():
        key = TABLE_KEY.format(layer_id=lid)
        if key in wanted:
            out[key] = TableRows(ckpt, int(lid), ()).read("weight", 0, rec["num_rows"])
    for lid in ckpt.state.get("tables", {}):
        key = TABLE_KEY.format(layer_id=lid)
        if key in wanted:
            path = table_file(ckpt, int(lid))
            out[key] = read_table(path, expected_fingerprint=ckpt.state.get("hash_fingerprint"))
    return out


def assembled_table_optimizer(
    ckpt: Checkpoint, layer_ids: tuple[int, ...], param_groups: Any
) -> dict[str, Any]:
    """The SparseAdam `state_dict` one process needs to continue a distributed run's tables."""
    state: dict[int, dict[str, Any]] = {}
    for i, lid in enumerate(layer_ids):
        rows = TableRows(ckpt, lid, layer_ids)
        if rows.step == 0:
            continue
        state[i] = {"step": rows.step}
        for part in TABLE_PARTS[1:]:
            state[i][part] = rows.read(part, 0, rows.num_rows)
    return {"state": state, "param_groups": param_groups}
