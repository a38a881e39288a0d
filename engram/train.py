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
  (including waiting for data); validation and checkpoint writes are excluded. Each record
  splits it into `wait_s` (data), `fwd_s` (forward and loss), `bwd_s` (backward) and `opt_s`
  (clipping, both optimizers, zeroing, router biases), so a step-time difference between two
  runs can be traced to a phase from the run's own metrics (the demo prints it). On a GPU
  these are host times (kernels are asynchronous) and only `step_s` is meaningful.
- Shape (torchtitan's): a small `Trainer` (build, step, evaluate, save/resume) whose tier and
  distribution choices are applied from outside by one function, `place` (the tables in RAM,
  on disk or sharded over ranks; DDP and `torch.compile` on the dense model; see
  `engram.parallel.placement`). This module imports nothing from `engram.parallel`: `train`,
  which composes the two, lives in `engram.run` (`from engram.run import train`).
- Distributed (`dist=`): the same loop on every rank. Each rank trains on its block of the
  global batch with its shard of every table and the dense weights in DDP; the logged losses
  are all-reduced to the global batch's mean, rank 0 alone writes metrics and commits
  checkpoints, and each step's record adds what this rank's row exchange and DDP all-reduce
  sent and how long they took (`xchg_*`, `ddp_allreduce_*`).
- The run directory has one writer (`engram.rundir`): a second process is refused, a refused
  or failed start leaves the directory as it was (config.json is written only once every
  check passed), SIGINT/SIGTERM save the step in progress before stopping (`TrainingInterrupted`),
  a write that fails (full disk) names the file and the cause, and a missing or corrupt LATEST
  falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from engram.atomic import atomic_write_text
from engram.checkpoint import (
    Checkpoint,
    assembled_tables,
    check_fingerprint,
    find_latest,
    load_model_weights,
    read_checkpoint,
    remove_stale_temporaries,
    set_rng_state,
    table_file,
)
from engram.compress import TokenizerCompressor
from engram.data import BatchLoader, DataSplits, prepare_data
from engram.data.tokenize import data_tokenizer
from engram.indexer import NgramIndexer
from engram.model import EngramLM, ParamCounts
from engram.optim import build_optimizer, lr_multiplier
from engram.run_config import ConfigError, RunConfig, base_difference
from engram.rundir import RunDir, RunDirError, config_differences, open_run_dir, os_cause
from engram.store.base import RowStore
from engram.store.mmap import MmapRowStore
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
    model: EngramLM  # or an `engram.hf.lm.HFCausalLM` (a run with a base model), same interface
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

    With `cfg.base` the model is that Hugging Face causal LM, loaded from its directory, with
    Engram attached when `cfg.engram` is set (`engram.hf.lm.build_hf_model`).

    `stores` serve the given Engram layers' rows (see `EngramLM`); their tables are not built.
    It is `{layer_id: RowStore}` or a function of the run's indexer returning one (stores that
    need the table sizes or the hash fingerprint).
    """
    tokenizer = tokenizer if tokenizer is not None else data_tokenizer(cfg.data)
    eot_id = separator_id(tokenizer)
    kwargs = {} if cache_dir is None else {"cache_dir": cache_dir}
    compressor = TokenizerCompressor.from_tokenizer(tokenizer, **kwargs)
    if cfg.model is not None and cfg.model.vocab_size < compressor.vocab_size:
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
    if cfg.base is not None:  # a Hugging Face causal LM as the backbone (engram.hf.lm)
        from engram.hf.lm import build_hf_model

        fp = None if indexer is None else indexer.hasher.fingerprint()
        hf_model = build_hf_model(cfg, tokenizer, compressor, eot_id, stores, fp)
        return RunParts(cfg, tokenizer, compressor, indexer, hf_model, eot_id)
    assert cfg.model is not None
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
    dist: Any = None,
) -> float:
    """Mean next-token cross-entropy over `(x, y)` numpy/torch batches (equal-size windows).

    A batch may be `(x, y, positions)` (see `DataSplits.val_batches(with_positions=True)`):
    the positions reach the indexer, for the "position" address control.

    With `dist` (an `engram.parallel.DistContext`), every rank is given the same batches and
    evaluates its block of each (a rank whose block of a short last batch is empty still runs
    one row, weighted 0, so that every rank makes the same table exchanges); the sums are all-reduced, so all ranks return the
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
            if dist is not None:  # this rank's contiguous block of the batch
                full_x, full_y, full_pos = x, y, pos
                x, y = _rank_block(full_x, dist), _rank_block(full_y, dist)
                pos = None if pos is None else _rank_block(pos, dist)
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


def _rank_block(t: torch.Tensor, dist: Any) -> torch.Tensor:
    """Rank `dist.rank`'s contiguous block of `t` along dim 0 (the last blocks may be shorter)."""
    return torch.tensor_split(t, dist.world_size)[dist.rank]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (empty if it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def checkpoint_table_stores(ckpt: Checkpoint) -> dict[int, RowStore]:
    """Read-only stores over the table files of a checkpoint whose tables were trained on disk."""
    fp = ckpt.state.get("hash_fingerprint")
    return {
        int(lid): MmapRowStore(
            table_file(ckpt, int(lid)),
            expected_fingerprint=fp,
            check_bounds=False,
        )
        for lid, rec in ckpt.state.get("tables", {}).items()
    }


def load_trained(
    ckpt_path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    stores: Mapping[int, RowStore] | None = None,
) -> tuple[RunParts, Checkpoint]:
    """A trained model (and its tokenizer/indexer) from a run or checkpoint directory.

    With `stores` ({layer_id: RowStore}, e.g. table files exported from this checkpoint), those
    layers read their rows from the stores and the checkpoint's tables are not loaded. Tables a
    run trained on disk (`train.table_store="mmap"`) are served read-only from the checkpoint's
    own table files unless `stores` says otherwise; tables a distributed run saved as shards
    are assembled.
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


# ------------------------------------------------------------------------------- the trainer
class Placement(Protocol):
    """A built run placed on its tiers and device (`engram.parallel.placement.Placed`)."""

    parts: RunParts
    model: EngramLM  # on `device`
    forward: Callable[..., Any]  # what a step calls: the model, its DDP wrapper, compiled...
    device: torch.device

    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager[Any]: ...
    def global_mean(self, values: list[float], stop: bool) -> tuple[list[float], bool]: ...
    def after_step(self) -> None: ...
    def counters(self) -> dict[str, float]: ...
    def guard(self, phase: str) -> contextlib.AbstractContextManager[Any]: ...
    def save(
        self, root: Path, step: int, optim_state: Any, state: Mapping[str, Any], keep: int
    ) -> Path: ...
    def load(self, ckpt: Checkpoint, opt: Any, layer_ids: tuple[int, ...]) -> None: ...
    def close(self) -> None: ...


# `place(build, resume_from)`: build the run through `build(stores) -> RunParts` with its tables
# placed, and wrap it; the caller binds the config, process groups, device and run directory.
PlaceFn = Callable[[Callable[[Any], RunParts], Path | None], Placement]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after the step in progress was saved.

    `str(exc)` is the line already printed on stderr (by rank 0):
    ``engram: interrupted at step N; saved <checkpoint path>``.
    """

    def __init__(self, message: str, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(message)
        self.message, self.step, self.checkpoint, self.signum = message, step, checkpoint, signum

    def __str__(self) -> str:
        return self.message


class _Interrupts:
    """SIGINT/SIGTERM during the loop: the first asks it to save and stop after the step in
    progress; a second one stops at once (KeyboardInterrupt). Only in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"engram: {signal.Signals(signum).name}: saving after the step in progress "
            "(interrupt again to stop at once, unsaved)",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _writing(what: str, path: Path) -> Iterator[None]:
    """An OSError (full disk, permissions) while writing `path` -> one line naming it."""
    try:
        yield
    except OSError as e:
        raise RunDirError(f"cannot write {what} {path}: {os_cause(e)}") from e


class Trainer:
    """One run: build it (placed by `place`, from outside), step, evaluate, save and resume.

    `run()` is the whole job: it holds the run directory, starts (resuming from its latest
    checkpoint when there is one), trains to `cfg.train.steps` and reports. `device` and `dist`
    (this rank's `engram.parallel.DistContext`) are the ones `place` was bound to.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | os.PathLike[str],
        place: PlaceFn,
        *,
        dist: Any = None,
        data: DataSplits | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg, self.out, self.dist, self.data = cfg, Path(out_dir), dist, data
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / METRICS_FILE
        self.main = dist is None or dist.is_main
        self.progress = progress
        self._place = place
        self.placed: Placement | None = None
        self.start_step = 0
        self.checkpoint: Path | None = None  # the newest committed checkpoint
        self.val_loss: float | None = None
        self.history: list[dict[str, Any]] = []

    def run(self, resume: bool = True, stop_after: int | None = None) -> TrainResult:
        """Hold the run directory, start, train; `stop_after` ends after that many steps."""
        with open_run_dir(self.out, writer=self.main) as run_dir:
            try:
                self.start(run_dir, resume)
                return self.fit(stop_after)
            finally:
                if self.placed is not None:
                    self.placed.close()

    # ---------------------------------------------------------------------------- start-up
    def start(self, run_dir: RunDir, resume: bool) -> None:
        """Check, build, place and load; write to the run directory only once all passed."""
        latest = self._resume_point(resume)
        tokenizer = data_tokenizer(self.cfg.data)
        if self.data is None:
            self.data = prepare_data(self.cfg.data, tokenizer, separator_id(tokenizer))
        self.placed = self._place(lambda s: build_run(self.cfg, tokenizer, stores=s), latest)
        self.parts, self.model = self.placed.parts, self.placed.model
        self.opt = build_optimizer(self.model, self.cfg.optim)
        if latest is not None:
            ckpt = read_checkpoint(latest)
            check_fingerprint(ckpt, self.parts.hash_fingerprint)
            layer_ids = () if self.cfg.engram is None else self.cfg.engram.layer_ids
            self.placed.load(ckpt, self.opt, layer_ids)
            set_rng_state(ckpt.state["rng"])
            self.start_step, self.checkpoint = ckpt.step, latest
        if self.main:
            with _writing("run directory", self.out):
                self.cfg.save(self.out / CONFIG_FILE)
                remove_stale_temporaries(self.ckpt_root)  # a killed writer's half checkpoint
            with _writing("metrics", self.metrics_path):
                if latest is not None:  # cut back to the checkpoint's step before appending
                    kept = [m for m in read_metrics(self.metrics_path) if m["step"] <= ckpt.step]
                    text = "".join(json.dumps(m) + "\n" for m in kept)
                    atomic_write_text(self.metrics_path, text)
                elif self.metrics_path.exists():
                    self.metrics_path.unlink()
            run_dir.commit()
        if self.dist is not None:
            self.dist.barrier("start-up (rank 0 preparing the run directory)")

    def _resume_point(self, resume: bool) -> Path | None:
        """The checkpoint this start continues (None: a fresh run); refuses one it cannot."""
        cfg, out = self.cfg, self.out
        if not resume:
            if (out / CONFIG_FILE).exists() and any(self.ckpt_root.glob("step-*")):
                raise ConfigError(
                    f"{out} already holds a run and resuming is off (--no-resume); continue it "
                    "by resuming, or choose a new output directory"
                )
            return None
        latest = find_latest(self.ckpt_root, fallback=True)
        if latest is None:
            return None
        if (out / CONFIG_FILE).is_file():
            previous = RunConfig.load(out / CONFIG_FILE).to_dict()
        else:
            previous = read_checkpoint(latest, verify=False).config
        old, new = dict(previous), cfg.to_dict()
        other_base = base_difference(old, new)
        if other_base is not None:
            raise ConfigError(
                f"{out} holds a run that cannot continue with this config: {other_base}; "
                "resume it from the same base or choose a new output directory"
            )
        old["train"] = {k: v for k, v in old["train"].items() if k != "steps"}
        new["train"] = {k: v for k, v in new["train"].items() if k != "steps"}
        diff = config_differences(old, new)
        if diff:
            raise ConfigError(
                f"{out} holds a run with a different config ({'; '.join(diff)}); resume it with "
                "the same config (only train.steps may change) or choose a new output directory"
            )
        return latest

    # -------------------------------------------------------------------------------- steps
    def step(self, step: int, stop: bool = False) -> tuple[dict[str, Any], bool]:
        """Optimizer step `step` (0-based, `grad_accum` micro-batches) -> (its metrics record,
        whether any rank asked to stop: `stop` is this rank's request)."""
        cfg, tc, placed = self.cfg, self.cfg.train, self.placed
        assert placed is not None
        device = placed.device
        t0 = time.perf_counter()
        lr_mult = lr_multiplier(step, tc.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        self.opt.set_lr(lr_mult)
        loss_sum = aux_sum = wait = fwd = bwd = 0.0
        before = placed.counters()
        for micro in range(tc.grad_accum):
            w0 = time.perf_counter()
            batch = next(self.loader).to(device, non_blocking=True)
            w1 = time.perf_counter()
            with placed.no_sync(micro + 1 == tc.grad_accum):  # DDP all-reduces once per step
                with _autocast(tc.bf16, device.type):
                    outp = placed.forward(batch.x, batch.rows, targets=batch.y)
                loss = outp.loss + outp.aux_loss
                w2 = time.perf_counter()
                (loss / tc.grad_accum).backward()
            loss_sum += float(outp.loss.detach())
            aux_sum += float(outp.aux_loss.detach())
            w3 = time.perf_counter()
            wait, fwd, bwd = wait + (w1 - w0), fwd + (w2 - w1), bwd + (w3 - w2)
        (loss_sum, aux_sum), stop = placed.global_mean([loss_sum, aux_sum], stop)
        o0 = time.perf_counter()
        gnorm = self.opt.clip_grad_norm()
        self.opt.step()
        self.opt.zero_grad()
        placed.after_step()
        self.model.update_router_biases()
        t1 = time.perf_counter()
        dt = t1 - t0
        train_loss = loss_sum / tc.grad_accum
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training loss became {train_loss} at step {step + 1}; lower optim.lr "
                f"(now {cfg.optim.lr}) or check the data"
            )
        tokens = tc.grad_accum * cfg.data.batch_size * cfg.data.seq_len
        rec: dict[str, Any] = {
            "step": step + 1, "tokens": (step + 1) * tokens, "loss": train_loss,
            "aux_loss": aux_sum / tc.grad_accum, "lr": cfg.optim.lr * lr_mult, "grad_norm": gnorm,
            "step_s": dt, "wait_s": wait, "fwd_s": fwd, "bwd_s": bwd, "opt_s": t1 - o0,
            "tokens_per_s": tokens / dt,
        }  # fmt: skip
        rec.update({k: v - before[k] for k, v in placed.counters().items()})
        return rec, stop

    def evaluate(self, n_batches: int) -> float:
        """Validation loss over the first `n_batches` validation batches."""
        positions = bool(getattr(self.parts.indexer, "needs_positions", False))
        batches = self.data.val_batches(n_batches, positions)  # type: ignore[union-attr]
        tc = self.cfg.train
        return evaluate(self.model, batches, self.parts.indexer, tc.bf16, dist=self.dist)

    def save(self, step: int) -> Path:
        """Commit checkpoint `step` (atomically; collective when distributed)."""
        assert self.placed is not None
        state = {
            "config": self.cfg.to_dict(),
            "hash_fingerprint": self.parts.hash_fingerprint,
            "compressor_fingerprint": self.parts.compressor.fingerprint,
            "val_loss": self.val_loss,
        }
        keep = self.cfg.train.keep_checkpoints
        self.checkpoint = self.placed.save(self.ckpt_root, step, self.opt.state_dict(), state, keep)
        return self.checkpoint

    # --------------------------------------------------------------------------------- loop
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train from the start step to `train.steps` (or `stop_after` steps), then report."""
        cfg, tc = self.cfg, self.cfg.train
        assert self.placed is not None
        end = tc.steps if stop_after is None else min(tc.steps, self.start_step + stop_after)
        rank, world = (0, 1) if self.dist is None else (self.dist.rank, self.dist.world_size)
        self.model.train()
        bar = tqdm(
            total=tc.steps, initial=self.start_step, desc=cfg.name, unit="step",
            disable=not (self.progress and self.main), dynamic_ncols=True, leave=True,
        )  # fmt: skip
        self.loader = BatchLoader(
            self.data.train, cfg.data, self.parts.indexer,  # type: ignore[union-attr]
            start_step=self.start_step * tc.grad_accum, prefetch=tc.prefetch, seed=tc.seed,
            pin_memory=self.placed.device.type == "cuda", rank=rank, world_size=world,
        )  # fmt: skip
        try:
            with (
                self._metrics_log() as log,
                self.placed.guard("training"),
                _Interrupts() as interrupts,
            ):
                for step in range(self.start_step, end):
                    rec, stop = self.step(step, interrupts.signum is not None)
                    final = step + 1 == tc.steps
                    if final or (tc.eval_every and (step + 1) % tc.eval_every == 0):
                        n_batches = tc.final_eval_batches if final else tc.eval_batches
                        self.val_loss = rec["val_loss"] = self.evaluate(n_batches)
                    self._record(rec, log, bar)
                    saved = step + 1 == end or bool(
                        tc.ckpt_every and (step + 1) % tc.ckpt_every == 0
                    )
                    if saved:
                        self.save(step + 1)
                    if (stop or (self.dist is None and interrupts.signum)) and step + 1 < end:
                        self._interrupted(step + 1, saved, interrupts.signum or signal.SIGTERM)
        finally:
            self.loader.close()
            bar.close()
        return self._result(end)

    def _metrics_log(self) -> contextlib.AbstractContextManager[Any]:
        if not self.main:
            return contextlib.nullcontext()
        with _writing("metrics", self.metrics_path):
            return open(self.metrics_path, "a", encoding="utf-8")

    def _record(self, rec: dict[str, Any], log: Any, bar: Any) -> None:
        if log is not None:
            with _writing("metrics", self.metrics_path):
                log.write(json.dumps(rec) + "\n")
                log.flush()
        self.history.append(rec)
        bar.update(1)
        post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
        if self.val_loss is not None:
            post["val"] = f"{self.val_loss:.3f}"
        bar.set_postfix(post, refresh=False)

    def _interrupted(self, step: int, saved: bool, signum: int) -> None:
        """Save step `step` (unless it just was), say where, and stop."""
        path = self.checkpoint if saved else self.save(step)
        assert path is not None
        message = f"engram: interrupted at step {step}; saved {path}"
        if self.main:
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(message, step, path, signum)

    def _result(self, end: int) -> TrainResult:
        tc = self.cfg.train
        if end == tc.steps and self.main:
            from engram.plots import plot_loss_curves

            with _writing("the loss plot", self.out / "loss.png"):
                plot_loss_curves(
                    {self.cfg.name: read_metrics(self.metrics_path)}, self.out / "loss.png"
                )
        assert self.checkpoint is not None
        history, train_loss, val_loss = self.history, None, self.val_loss
        step_times = [r["step_s"] for r in history]
        if history:
            train_loss = history[-1]["loss"]
        else:  # nothing left to train: report the finished run from its metrics
            past = read_metrics(self.metrics_path)
            step_times = [r["step_s"] for r in past if "step_s" in r]
            train_loss = past[-1]["loss"] if past else None
            val_loss = next((r["val_loss"] for r in reversed(past) if "val_loss" in r), None)
        timed = step_times[1:] or step_times  # the first step pays one-off allocation costs
        med = statistics.median(timed) if timed else float("nan")
        tokens_per_step = tc.grad_accum * self.cfg.data.batch_size * self.cfg.data.seq_len
        return TrainResult(
            out_dir=self.out, name=self.cfg.name, step=end, train_loss=train_loss,
            val_loss=val_loss, tokens_per_s=tokens_per_step / med if timed else float("nan"),
            step_time_s=med, loader_wait_s=sum(h["wait_s"] for h in history),
            counts=self.model.param_counts(), checkpoint=self.checkpoint, history=history,
        )  # fmt: skip
