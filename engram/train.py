"""The training loop: build a run from its config, train, validate, checkpoint, resume.

Design choices:
- `train(cfg, out_dir)` is the whole job and the CLI calls nothing else. A run directory holds
  `config.json` (the resolved config), `metrics.jsonl` (one record per step, plus validation
  records), `checkpoints/` and `loss.png`, so any figure traces back to what produced it.
- Batches are a pure function of (seed, step) (see `engram.data`), model init is seeded, and the
  router-bias update and the optimizers' state are checkpointed, so resuming from a checkpoint
  replays exactly the losses an uninterrupted run produces (proven in the tests). On resume the
  metrics file is cut back to the checkpoint's step before appending.
- Hash rows are computed by the loader's background thread while the previous step runs; the
  time the step waited for its batch is logged (`wait_s`), so "hashing is off the critical path"
  is a measured claim per run.
- Tables are addressed by the hash configuration; the checkpoint stores its fingerprint and
  `load_trained`/resume refuse a mismatch before touching weights.
- Device: `train.device` ("cpu" by default, where runs are bit-reproducible; "cuda" on a GPU).
  The model is initialised on the CPU (same init everywhere) and moved; the loader pins its
  batches when the device is CUDA so the copies are asynchronous; autocast follows the device.
- Timing: `step_s` covers forward, backward and the optimizer step of one optimizer step
  (including waiting for data); validation and checkpoint writes are excluded.
- Distributed (`dist=`, see `engram.parallel`): the same loop on every rank. Each rank trains
  on its block of the global batch with its shard of every table (`ShardedRowStore`) and the
  dense weights in DDP; the logged losses are all-reduced to the global batch's mean, rank 0
  alone writes metrics and commits checkpoints, and each step's record adds what this rank's
  row exchange and DDP all-reduce sent and how long they took (`xchg_*`, `ddp_allreduce_*`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engram.atomic import atomic_write_text
from engram.checkpoint import (
    TABLES_DIR,
    Checkpoint,
    check_fingerprint,
    find_latest,
    load_model_weights,
    load_optimizer_state,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    set_rng_state,
)
from engram.compress import TokenizerCompressor
from engram.data import BatchLoader, DataSplits, check_shard, prepare_data
from engram.data.tokenize import data_tokenizer
from engram.indexer import NgramIndexer
from engram.model import EngramLM, ParamCounts
from engram.optim import build_optimizer, lr_multiplier
from engram.parallel.context import DistContext, collective_errors
from engram.parallel.parallelize import (
    DenseCommStats,
    parallelize,
    rank_slice,
    sharded_stores,
    sync_router_loads,
)
from engram.parallel.tables import (
    SHARDED_KEY,
    assembled_table_optimizer,
    assembled_tables,
    load_shards,
    save_distributed_checkpoint,
)
from engram.run_config import ConfigError, RunConfig
from engram.store.base import RowStore
from engram.store.mmap import MmapRowStore
from engram.store.sharded import ShardedRowStore
from engram.store.trainable import DiskTrainedStore
from engram.tokenizer import separator_id

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


# Stores for `build_run`: {layer_id: RowStore}, or a function of the indexer returning that.
StoreSpec = Mapping[int, RowStore] | Callable[[NgramIndexer], Mapping[int, RowStore]]


@dataclass
class RunParts:
    """A built run: tokenizer, indexer (None without Engram) and model."""

    cfg: RunConfig
    tokenizer: Any
    compressor: TokenizerCompressor
    indexer: NgramIndexer | None
    model: EngramLM
    eot_id: int  # the tokenizer's end-of-document id (packs documents, resets n-grams)

    @property
    def hash_fingerprint(self) -> str | None:
        return None if self.indexer is None else self.indexer.fingerprint()


@dataclass
class TrainResult:
    """What a finished `train` call reports."""

    out_dir: Path
    name: str
    step: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float  # median over this call's steps
    step_time_s: float  # median seconds per optimizer step
    loader_wait_s: float  # total seconds steps waited for their batch
    counts: ParamCounts
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else math.exp(self.val_loss)


def build_run(
    cfg: RunConfig,
    tokenizer: Any | None = None,
    cache_dir: Any = None,
    stores: StoreSpec | None = None,
) -> RunParts:
    """Tokenizer, compressor, indexer and a freshly initialised model for `cfg` (seeded).

    `stores` serve the given Engram layers' rows (see `EngramLM`); their tables are not built.
    It is `{layer_id: RowStore}` or a function of the run's indexer returning one (stores that
    need the table sizes or the hash fingerprint).
    """
    tokenizer = tokenizer if tokenizer is not None else data_tokenizer(cfg.data)
    eot_id = separator_id(tokenizer)
    kwargs = {} if cache_dir is None else {"cache_dir": cache_dir}
    compressor = TokenizerCompressor.from_tokenizer(tokenizer, **kwargs)
    if cfg.model.vocab_size < compressor.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{compressor.vocab_size} ids (data.tokenizer={cfg.data.tokenizer!r})"
        )
    indexer = None
    table_sizes = None
    if cfg.engram is not None:
        if not 0 <= cfg.engram.pad_id < compressor.vocab_size:
            raise ConfigError(
                f"engram.pad_id={cfg.engram.pad_id} is not an id of the tokenizer "
                f"(data.tokenizer={cfg.data.tokenizer!r} has {compressor.vocab_size} ids; its "
                f"end-of-document id is {eot_id})"
            )
        indexer = NgramIndexer(cfg.engram, compressor, tokenizer, sep_id=eot_id)
        table_sizes = {lid: indexer.hasher.flat_table_sizes(lid) for lid in cfg.engram.layer_ids}
        if callable(stores):
            stores = stores(indexer)
    torch.manual_seed(cfg.train.seed)
    model = EngramLM(
        cfg.model,
        cfg.engram,
        table_sizes,
        table_std=cfg.train.table_std,
        seed=cfg.train.seed,
        stores=stores,
    )
    return RunParts(cfg, tokenizer, compressor, indexer, model, eot_id)


def _autocast(enabled: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device, refusing CUDA where there is none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but this machine has no CUDA device; use 'cpu'")
    return device


@torch.no_grad()
def evaluate(
    model: EngramLM,
    batches: Iterator[tuple[Any, ...]] | list[tuple[Any, ...]],
    indexer: NgramIndexer | None,
    bf16: bool = False,
    dist: DistContext | None = None,
) -> float:
    """Mean next-token cross-entropy over `(x, y)` numpy/torch batches (equal-size windows).

    A batch may be `(x, y, positions)` (see `DataSplits.val_batches(with_positions=True)`):
    the positions reach the indexer, for the "position" address control.

    With `dist`, every rank is given the same batches and evaluates its block of each (a rank
    whose block of a short last batch is empty still runs one row, weighted 0, so that every
    rank makes the same table exchanges); the sums are all-reduced, so all ranks return the
    single-process number up to float summation order.
    """
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, n = 0.0, 0
    try:
        for batch in batches:
            x = torch.as_tensor(batch[0], dtype=torch.long)
            y = torch.as_tensor(batch[1], dtype=torch.long)
            pos = torch.as_tensor(batch[2], dtype=torch.long) if len(batch) > 2 else None
            weight = 1.0
            if dist is not None:
                full_x, full_y, full_pos = x, y, pos
                x, y = rank_slice(full_x, dist), rank_slice(full_y, dist)
                pos = None if pos is None else rank_slice(pos, dist)
                if x.shape[0] == 0:
                    x, y, weight = full_x[:1], full_y[:1], 0.0
                    pos = None if full_pos is None else full_pos[:1]
            rows = None
            if indexer is not None:
                kw = {} if pos is None else {"positions": pos.numpy()}
                rows = torch.as_tensor(indexer.rows(x.numpy(), **kw))
            x, y = x.to(device), y.to(device)
            rows = None if rows is None else rows.to(device)
            with _autocast(bf16, device.type):
                out = model(x, rows, targets=y)
            total += weight * float(out.loss) * y.numel()
            n += int(weight) * y.numel()
    finally:
        model.train(was_training)
    if dist is not None:
        total, n = dist.all_reduce_sum([total, float(n)], "evaluation")
    if n == 0:
        raise ValueError("evaluate got no batches")
    return total / n


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (empty if it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _same_run(a: RunConfig, b: RunConfig) -> bool:
    """Equal configs up to train.steps (extending a run is a legitimate resume)."""
    da, db = a.to_dict(), b.to_dict()
    da["train"].pop("steps")
    db["train"].pop("steps")
    return da == db


def checkpoint_table_stores(ckpt: Checkpoint) -> dict[int, RowStore]:
    """Read-only stores over the table files of a checkpoint whose tables were trained on disk."""
    fp = ckpt.state.get("hash_fingerprint")
    return {
        int(lid): MmapRowStore(
            ckpt.path / TABLES_DIR / rec["files"]["weight"],
            expected_fingerprint=fp,
            check_bounds=False,
        )
        for lid, rec in ckpt.state.get("tables", {}).items()
    }


def _disk_tables(
    cfg: RunConfig, out: Path, latest: Path | None
) -> Callable[[NgramIndexer], dict[int, DiskTrainedStore]]:
    """Stores for `train.table_store="mmap"`: fresh files, or copies of the checkpoint's."""
    assert cfg.engram is not None
    engram_cfg = cfg.engram
    work = out / TABLES_DIR

    def make(indexer: NgramIndexer) -> dict[int, DiskTrainedStore]:
        fp = indexer.fingerprint()
        saved = None if latest is None else read_checkpoint(latest, verify=False)
        stores = {}
        for lid in engram_cfg.layer_ids:
            if saved is not None:
                rec = saved.state.get("tables", {}).get(str(lid))
                if rec is None:
                    raise ConfigError(f"checkpoint {saved.path} has no table files for layer {lid}")
                stores[lid] = DiskTrainedStore.restore(
                    work, lid, saved.path / TABLES_DIR, rec["step"], expected_fingerprint=fp
                )
            else:
                sizes = indexer.hasher.flat_table_sizes(lid)
                stores[lid] = DiskTrainedStore.create(
                    work, lid, sum(sizes), engram_cfg.head_dim, fingerprint=fp,
                    std=cfg.train.table_std, seed=engram_cfg.seed + lid,
                    meta={"sub_table_sizes": sizes, "run": cfg.name},
                )  # fmt: skip
        return stores

    return make


def load_trained(
    ckpt_path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    stores: Mapping[int, RowStore] | None = None,
) -> tuple[RunParts, Checkpoint]:
    """A trained model (and its tokenizer/indexer) from a run or checkpoint directory.

    With `stores` ({layer_id: RowStore}, e.g. table files exported from this checkpoint), those
    layers read their rows from the stores and the checkpoint's tables are not loaded. Tables a
    run trained on disk (`train.table_store="mmap"`) are served read-only from the checkpoint's
    own table files unless `stores` says otherwise.
    """
    ckpt = read_checkpoint(ckpt_path)
    try:
        cfg = RunConfig.from_dict(ckpt.config)
    except ConfigError as e:
        raise ConfigError(f"checkpoint {ckpt.path} holds an invalid config: {e}") from e
    if stores is None and ckpt.state.get("tables"):
        stores = checkpoint_table_stores(ckpt)
    parts = build_run(cfg, tokenizer, stores=stores)
    check_fingerprint(ckpt, parts.hash_fingerprint)
    load_model_weights(ckpt, parts.model, assembled_tables(ckpt, parts.model.state_dict()))
    parts.model.eval()
    return parts, ckpt


def _exchange_totals(stores: Mapping[int, ShardedRowStore]) -> dict[str, float]:
    """Bytes this rank sent to other ranks and seconds spent exchanging, over all tables."""
    keys = (
        "ids", "unique_ids", "remote_ids", "remote_ids_dup", "id_bytes_sent", "row_bytes_sent",
        "row_bytes_received", "grad_bytes_sent", "forward_s", "backward_s",
    )  # fmt: skip
    stats = [s.stats.as_dict() for s in stores.values()]
    return {f"xchg_{k}": sum(st[k] for st in stats) for k in keys}


def _load_for_training(
    ckpt: Checkpoint,
    cfg: RunConfig,
    model: EngramLM,
    opt: Any,
    sharded: Mapping[int, ShardedRowStore],
) -> None:
    """Weights and optimizer state into a run about to resume, whatever wrote the checkpoint.

    Sharded tables (this run is distributed) read their rows from a checkpoint of any world
    size, or from a single process's table and SparseAdam state; a single process resuming a
    distributed run gets its tables and moments assembled from the shards.
    """
    layer_ids = () if cfg.engram is None else cfg.engram.layer_ids
    optim_state = load_optimizer_state(ckpt)
    if sharded:
        load_model_weights(ckpt, model)
        load_shards(ckpt, sharded, layer_ids)
        if optim_state is not None:
            optim_state.pop("table", None)  # a single process's SparseAdam: now in the shards
    else:
        load_model_weights(ckpt, model, assembled_tables(ckpt, model.state_dict()))
        if ckpt.state.get(SHARDED_KEY) and optim_state is not None and opt.table is not None:
            groups = opt.table.state_dict()["param_groups"]
            optim_state["table"] = assembled_table_optimizer(ckpt, layer_ids, groups)
    if optim_state is not None:
        opt.load_state_dict(optim_state)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to `n` inside the block (0 leaves it alone)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(before)


def train(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    data: DataSplits | None = None,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train `cfg` into `out_dir`, resuming from its latest checkpoint when there is one.

    `stop_after` ends this call after that many steps (with a checkpoint), as an interruption
    would; `data` reuses already-prepared splits (same data config) across runs.

    With `dist` (one call per rank, see `engram.parallel`), `cfg.data.batch_size` is the global
    batch: each rank trains on its block, Engram tables are row-sharded over the ranks and the
    dense parameters replicated with DDP; rank 0 writes the metrics and commits checkpoints,
    whose tables are saved as shards that reload on any number of ranks (or in one process).
    `cfg.train.threads` (when > 0) sets PyTorch's thread count for the call.
    """
    with torch_threads(cfg.train.threads):
        return _train(cfg, out_dir, resume, progress, stop_after, data, dist)


def _train(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str],
    resume: bool,
    progress: bool,
    stop_after: int | None,
    data: DataSplits | None,
    dist: DistContext | None,
) -> TrainResult:
    device = resolve_device(cfg.train.device) if dist is None else dist.device
    main = dist is None or dist.is_main
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    latest = find_latest(ckpt_root) if resume else None
    if latest is None and (out / CONFIG_FILE).exists() and any(ckpt_root.glob("step-*")):
        raise ConfigError(f"{out} already holds a run; use resume or a new output directory")
    if latest is not None:
        previous = RunConfig.load(out / CONFIG_FILE)
        if not _same_run(previous, cfg):
            raise ConfigError(
                f"{out} holds a run with a different config; resume it with the same config "
                "(only train.steps may change) or choose a new output directory"
            )
    on_disk = cfg.train.table_store == "mmap" and cfg.engram is not None
    if on_disk and device.type != "cpu":
        raise ConfigError("train.table_store='mmap' trains on the CPU; use train.device='cpu'")
    if dist is not None:
        if on_disk:
            raise ConfigError(
                "train.table_store='mmap' trains in one process; a distributed run shards its "
                "tables over the ranks' memory (use train.table_store='ram')"
            )
        check_shard(cfg.data.batch_size, dist.rank, dist.world_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
        remove_stale_temporaries(ckpt_root)  # a killed writer's half checkpoint is never LATEST
    if dist is not None:
        dist.barrier("start-up (rank 0 preparing the run directory)")
    stores: StoreSpec | None = None
    if on_disk:
        stores = _disk_tables(cfg, out, latest)
    elif dist is not None and cfg.engram is not None:
        e = cfg.engram
        stores = sharded_stores(dist, e.layer_ids, e.head_dim, e.seed, cfg.train.table_std)
    parts = build_run(cfg, stores=stores)
    disk_tables = {
        lid: e.store
        for lid, e in parts.model.engram_layers().items()
        if isinstance(e.store, DiskTrainedStore)
    }
    sharded = {
        lid: e.store
        for lid, e in parts.model.engram_layers().items()
        if isinstance(e.store, ShardedRowStore)
    }
    model, indexer = parts.model.to(device), parts.indexer
    if data is None:
        data = prepare_data(cfg.data, parts.tokenizer, parts.eot_id)
    opt = build_optimizer(model, cfg.optim)
    tc = cfg.train
    start = 0
    metrics_path = out / METRICS_FILE
    if latest is not None:
        ckpt = read_checkpoint(latest)
        check_fingerprint(ckpt, parts.hash_fingerprint)
        _load_for_training(ckpt, cfg, model, opt, sharded)
        set_rng_state(ckpt.state["rng"])
        start = ckpt.step
        if main:
            kept = [m for m in read_metrics(metrics_path) if m["step"] <= start]
            atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
    elif main and metrics_path.exists():
        metrics_path.unlink()

    counts = model.param_counts()
    dense_comm = DenseCommStats()
    ddp = parallelize(model, dist, dense_comm) if dist is not None else None
    fwd = ddp if ddp is not None else model
    fwd = torch.compile(fwd) if tc.compile else fwd
    model.train()
    positions = bool(getattr(indexer, "needs_positions", False))  # val batches carry them
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    tokens_per_step = tc.grad_accum * cfg.data.batch_size * cfg.data.seq_len
    history: list[dict[str, Any]] = []
    step_times: list[float] = []
    train_loss = val_loss = None
    ckpt_path = latest

    def state_json() -> dict[str, Any]:
        return {
            "config": cfg.to_dict(),
            "hash_fingerprint": parts.hash_fingerprint,
            "compressor_fingerprint": parts.compressor.fingerprint,
            "val_loss": val_loss,
        }

    bar = tqdm(
        total=tc.steps, initial=start, desc=cfg.name, unit="step", disable=not (progress and main),
        dynamic_ncols=True, leave=True,
    )  # fmt: skip
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    loader = BatchLoader(
        data.train, cfg.data, indexer, start_step=start * tc.grad_accum,
        prefetch=tc.prefetch, seed=tc.seed, pin_memory=device.type == "cuda",
        rank=rank, world_size=world,
    )  # fmt: skip
    failures = (
        contextlib.nullcontext if dist is None else lambda: collective_errors(dist, "training")
    )
    try:
        with (
            open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as log,
            failures(),
        ):
            for step in range(start, end):
                t0 = time.perf_counter()
                lr_mult = lr_multiplier(
                    step, tc.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
                )
                opt.set_lr(lr_mult)
                loss_sum = aux_sum = wait = 0.0
                exchanged = _exchange_totals(sharded)
                ddp_before = (dense_comm.seconds, dense_comm.bytes)
                for micro in range(tc.grad_accum):
                    w0 = time.perf_counter()
                    batch = next(loader).to(device, non_blocking=True)
                    wait += time.perf_counter() - w0
                    sync = ddp is None or micro + 1 == tc.grad_accum  # all-reduce once per step
                    with contextlib.nullcontext() if sync else ddp.no_sync():  # type: ignore[union-attr]
                        with _autocast(tc.bf16, device.type):
                            outp = fwd(batch.x, batch.rows, targets=batch.y)
                        loss = outp.loss + outp.aux_loss
                        (loss / tc.grad_accum).backward()
                    loss_sum += float(outp.loss.detach())
                    aux_sum += float(outp.aux_loss.detach())
                if dist is not None:  # the global batch's mean, as one process would log it
                    loss_sum, aux_sum = (
                        v / world for v in dist.all_reduce_sum([loss_sum, aux_sum], "loss logging")
                    )
                gnorm = opt.clip_grad_norm()
                opt.step()
                opt.zero_grad()
                if dist is not None:
                    sync_router_loads(model, dist)
                model.update_router_biases()
                dt = time.perf_counter() - t0
                step_times.append(dt)
                train_loss = loss_sum / tc.grad_accum
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training loss became {train_loss} at step {step + 1}; lower optim.lr "
                        f"(now {cfg.optim.lr}) or check the data"
                    )
                rec: dict[str, Any] = {
                    "step": step + 1,
                    "tokens": (step + 1) * tokens_per_step,
                    "loss": train_loss,
                    "aux_loss": aux_sum / tc.grad_accum,
                    "lr": cfg.optim.lr * lr_mult,
                    "grad_norm": gnorm,
                    "step_s": dt,
                    "wait_s": wait,
                    "tokens_per_s": tokens_per_step / dt,
                }
                if sharded:  # this rank's row exchange during the step (see ExchangeStats)
                    now = _exchange_totals(sharded)
                    rec.update({k: now[k] - exchanged[k] for k in now})
                if ddp is not None:  # DDP's dense all-reduce (in flight, overlapping backward)
                    rec["ddp_allreduce_s"] = dense_comm.seconds - ddp_before[0]
                    rec["ddp_allreduce_bytes"] = dense_comm.bytes - ddp_before[1]
                last = step + 1 == end
                final = step + 1 == tc.steps
                if final or (tc.eval_every and (step + 1) % tc.eval_every == 0):
                    n_batches = tc.final_eval_batches if final else tc.eval_batches
                    val_loss = evaluate(
                        model, data.val_batches(n_batches, positions), indexer, tc.bf16, dist=dist
                    )
                    rec["val_loss"] = val_loss
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                history.append(rec)
                bar.update(1)
                post = {"loss": f"{train_loss:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                if val_loss is not None:
                    post["val"] = f"{val_loss:.3f}"
                bar.set_postfix(post, refresh=False)
                if last or (tc.ckpt_every and (step + 1) % tc.ckpt_every == 0):
                    if dist is not None:
                        ckpt_path = save_distributed_checkpoint(
                            ckpt_root, step + 1, model, opt.state_dict(), state_json(),
                            dist, sharded, keep=tc.keep_checkpoints,
                        )  # fmt: skip
                    else:
                        ckpt_path = save_checkpoint(
                            ckpt_root, step + 1, model, opt.state_dict(), state_json(),
                            keep=tc.keep_checkpoints, tables=disk_tables,
                        )  # fmt: skip
    finally:
        loader.close()
        bar.close()
        for t in disk_tables.values():
            t.close()

    if end == tc.steps and main:
        from engram.plots import plot_loss_curves

        plot_loss_curves({cfg.name: read_metrics(metrics_path)}, out / "loss.png")
    assert ckpt_path is not None
    if not history:  # nothing left to train: report the finished run from its metrics
        past = read_metrics(metrics_path)
        step_times = [r["step_s"] for r in past if "step_s" in r]
        train_loss = past[-1]["loss"] if past else None
        val_loss = next((r["val_loss"] for r in reversed(past) if "val_loss" in r), None)
    timed = step_times[1:] or step_times  # the first step pays one-off allocation costs
    med = statistics.median(timed) if timed else float("nan")
    return TrainResult(
        out_dir=out,
        name=cfg.name,
        step=end,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens_per_s=tokens_per_step / med if timed else float("nan"),
        step_time_s=med,
        loader_wait_s=sum(h["wait_s"] for h in history),
        counts=counts,
        checkpoint=ckpt_path,
        history=history,
    )
