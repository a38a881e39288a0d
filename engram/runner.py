"""Train several independent runs, one after another or side by side in worker processes.

The demo, the ablation and the sweep each train a list of ordinary runs on the same data. On a
machine with a few cores, two small runs with one thread each finish sooner than the same runs
one after another with two threads each (small matrices do not scale across threads), and a
fixed thread count per run keeps every result bit-reproducible whatever runs beside it.

Design choices:
- A job is (config, run directory, optional second text); a worker trains it with
  `engram.run.train` (resuming, or re-reporting a finished run) and evaluates it on the second
  text (`engram.heldout`). Nothing is shared between workers but the read-only caches, which the
  parent builds first (`prepare_caches`) so that no two workers tokenize the same corpus.
- Workers are spawned processes (`multiprocessing` "spawn": no forked torch or thread state).
- Progress for side-by-side runs is read by the parent from each run's `metrics.jsonl` (the
  trainer appends one record per step), one bar per run: the workers print nothing.
- Results come back in job order whatever the completion order; `on_done` is called as each
  finishes (the ablation rewrites its report there).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from engram.run_config import RunConfig

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Job:
    """One run to train: its config, its directory, and a second text to evaluate it on."""

    cfg: RunConfig
    out_dir: Path
    second: tuple[str, str, int | None] | None = None  # (source, "val" | "all", max batches)


@dataclass(frozen=True)
class JobResult:
    job: Job
    val_loss: float | None
    second_loss: float | None
    step_time_s: float  # median seconds per optimizer step (see TrainResult)
    seconds: float  # wall time of this job in its worker
    step: int  # the step the run reached


def run_job(cfg_dict: dict[str, Any], out: str, second: tuple[str, str, int | None] | None,
            progress: bool) -> tuple[float | None, float | None, float, float, int]:  # fmt: skip
    """Train (or re-report) one run and evaluate it on the second text; runs in a worker."""
    from engram.heldout import heldout_loss
    from engram.run import train
    from engram.train import torch_threads

    t0 = time.perf_counter()
    cfg = RunConfig.from_dict(cfg_dict)
    result = train(cfg, out, progress=progress)
    second_loss = None
    if second is not None:
        with torch_threads(cfg.train.threads):
            second_loss = heldout_loss(out, second[0], split=second[1], max_batches=second[2])
        second_loss = second_loss["loss"]
    return result.val_loss, second_loss, result.step_time_s, time.perf_counter() - t0, result.step


def prepare_caches(cfg: RunConfig, second_sources: Sequence[str] = ()) -> None:
    """Build the tokenizer, compressor and token caches the jobs will read, once."""
    from engram.compress import TokenizerCompressor
    from engram.data import prepare_data
    from engram.data.tokenize import data_tokenizer
    from engram.tokenizer import separator_id

    tok = data_tokenizer(cfg.data)
    TokenizerCompressor.from_tokenizer(tok)
    prepare_data(cfg.data, tok, separator_id(tok))
    for source in second_sources:
        prepare_data(replace(cfg.data, source=source), tok, separator_id(tok))


def _last_step(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def run_jobs(
    jobs: Sequence[Job],
    n_workers: int = 1,
    *,
    progress: bool = True,
    on_done: Callable[[int, JobResult], None] | None = None,
) -> list[JobResult]:
    """Train every job (`n_workers` at a time; 1 = in this process) and return their results."""
    results: list[JobResult | None] = [None] * len(jobs)

    def finish(i: int, out: tuple[float | None, float | None, float, float, int]) -> None:
        results[i] = JobResult(jobs[i], *out)
        if on_done is not None:
            on_done(i, results[i])

    if n_workers <= 1:
        for i, job in enumerate(jobs):
            finish(i, run_job(job.cfg.to_dict(), str(job.out_dir), job.second, progress))
        return [r for r in results if r is not None]

    ctx = multiprocessing.get_context("spawn")
    bars: dict[int, tqdm] = {}
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        pending = {
            pool.submit(run_job, j.cfg.to_dict(), str(j.out_dir), j.second, False): i
            for i, j in enumerate(jobs)
        }
        while pending:
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            if progress:
                for i, job in enumerate(jobs):
                    if results[i] is not None and i not in bars:
                        continue
                    step = _last_step(job.out_dir / METRICS)
                    if i not in bars and step > 0:
                        bars[i] = tqdm(total=job.cfg.train.steps, desc=job.cfg.name,
                                       unit="step", dynamic_ncols=True, leave=True)  # fmt: skip
                    if i in bars:
                        bars[i].update(step - bars[i].n)
            for fut in done:
                i = pending.pop(fut)
                if i in bars:
                    bars[i].update(jobs[i].cfg.train.steps - bars[i].n)
                    bars[i].close()
                    del bars[i]
                finish(i, fut.result())
    for bar in bars.values():
        bar.close()
    return [r for r in results if r is not None]
