"""Run a study: execute its cells in order, skipping finished ones, then write the report.

Single process: cells run one at a time in dependency order. Several processes (for
example ``torchrun --nproc_per_node=8 -m condnoise study fmnist-full``, or several
``condnoise study`` commands on machines sharing the study folder): each process acts as
a worker that claims ready cells with a lock file and runs them on its own GPU; the
rank-0 process writes the report once every cell is done. A worker that stops (SIGSTOP, a
lost node) loses its cells once their heartbeat is older than the study's ``lock_timeout``;
the worker that takes one over resumes it from its last checkpoint (train) or shard
(sample). Cluster jobs (:mod:`condnoise.study.submit`) run one cell each with
:func:`run_cell`.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from condnoise.errors import UserError
from condnoise.io import write_text
from condnoise.locks import DEFAULT_STALE_AFTER, Lock, LockLost
from condnoise.provenance import write_provenance
from condnoise.study.cache import CellLog, claim, is_done, mark_done, reset_cell
from condnoise.study.grid import Cell, build_cells, plan_table, select
from condnoise.study.spec import StudySpec

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip
POLL_SECONDS = 5.0
#: stages that continue from their own checkpoints / shards
RESUMABLE = ("autoencoder", "train", "distill", "finetune", "sample")


@dataclass
class Worker:
    """This process's place among the study's workers and the device it runs cells on."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # None: the stages pick (cuda if present, else cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_from_env(device: str | None = None) -> Worker:
    """Read torchrun's environment, then hide it from the stages.

    Under torchrun every rank is an independent cell worker, so the trainer must not try
    to join a process group with the other ranks: the distributed variables are removed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        for k in DIST_ENV:
            os.environ.pop(k, None)
        if device is None:
            device = f"cuda:{local}"
    return Worker(rank=rank, world=world, device=device)


@dataclass
class StudyRun:
    """What ``run_study`` did."""

    study_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None


StageFn = Callable[[Cell, Path, dict[str, Path], "RunContext"], dict[str, Any] | None]


@dataclass
class RunContext:
    spec: StudySpec
    study_dir: Path
    device: str | None
    progress: bool = True
    cells: dict[str, Cell] = field(default_factory=dict)
    lock_timeout: float = DEFAULT_STALE_AFTER  # the study's; also the train run folder's lock


def default_study_dir(spec: StudySpec) -> Path:
    return Path(spec.out_dir or Path("runs") / "study" / spec.name)


def plan(spec: StudySpec, study_dir: Path, *, stages=None, only=None) -> str:
    """The ``--dry-run`` text for the selected cells."""
    cells = select(build_cells(spec), stages=stages, only=only)
    log = CellLog(study_dir / "cells.jsonl")
    done = {c.key for c in cells if is_done(c.dir(study_dir))}
    header = (
        f"study {spec.name} ({spec.source}) -> {study_dir}\n"
        f"{len(spec.variants)} variants x {len(spec.architectures)} architecture(s) x "
        f"{len(spec.seeds)} seed(s); guidance {spec.sample['guidance']}; "
        f"{spec.sample['num_samples']} samples per scale, {spec.sample['sampler']} "
        f"{spec.sample['steps']} steps\n"
    )
    if spec.step_sweep:
        header += (f"step sweep: {spec.step_sweep['steps']} sampler steps at guidance "
                   f"{spec.step_sweep['guidance']} for the few-step students (lcm) and their "
                   f"teachers ({spec.sample['sampler']})\n")  # fmt: skip
    if spec.autoencoder:
        ae = spec.autoencoder["config"]
        header += (f"autoencoder: {ae['model']['kind']}-f{ae['model']['downsample']}, "
                   f"{ae['train']['steps']} steps x {ae['train']['batch_size']}, trained once for "
                   f"{', '.join(spec.latent_archs)}\n")  # fmt: skip
    text = header + plan_table(cells, study_dir, log.durations(), done)
    if "fmnist-classifier" in spec.evaluate["extractors"] and not _classifier_cached():
        text += ("\nplus ~1-2 min once: the fmnist-classifier is not cached yet and is trained "
                 "on first use ($CONDNOISE_CACHE or ~/.cache/condnoise)")  # fmt: skip
    return text


def _classifier_cached() -> bool:
    from condnoise.evaluation.classifier import WEIGHTS_NAME, cache_dir

    return (cache_dir() / WEIGHTS_NAME).is_file()


def write_study_files(spec: StudySpec, study_dir: Path) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    resolved = spec.resolved()
    write_text(study_dir / "study.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_provenance(study_dir, resolved, spec.seeds[0])


def run_study(
    spec: StudySpec,
    study_dir: Path | None = None,
    *,
    stages: list[str] | None = None,
    only: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    stage_fns: dict[str, StageFn] | None = None,
    log_fn: Callable[[str], None] = print,
) -> StudyRun:
    """Run every selected cell that is not finished yet, then (re)write the report.

    A cell whose dependency is neither done nor selected raises a UserError naming the
    stage to run first. ``stages`` may include ``report``; with no selection every stage
    runs and the report is written.
    """
    from condnoise.study import stages as stage_module

    study_dir = Path(study_dir or default_study_dir(spec))
    worker = worker_from_env(device)
    all_cells = build_cells(spec)
    chosen = select(all_cells, stages=stages, only=only)
    if worker.is_main:
        write_study_files(spec, study_dir)
    ctx = RunContext(spec, study_dir, worker.device, progress, {c.id: c for c in all_cells},
                     spec.lock_timeout)  # fmt: skip
    pending = [c for c in chosen if c.stage != "report"]
    _check_dependencies(pending, chosen, ctx)
    result = StudyRun(study_dir)
    runner = _Worker(ctx, stage_fns or stage_module.STAGE_FUNCTIONS, worker, log_fn)
    runner.work_through(pending, result)
    if worker.is_main and (not stages or "report" in stages):
        if worker.world > 1:
            _wait_all([c for c in chosen if c.stage != "report"], study_dir)
        from condnoise.study.report import write_report

        result.report = write_report(spec, study_dir, log_fn=log_fn)
    return result


def _check_dependencies(pending: list[Cell], chosen: list[Cell], ctx: RunContext) -> None:
    """Every dependency of a selected cell is selected too or already done."""
    for c in pending:
        for d in c.deps:
            dep = ctx.cells[d]
            if dep not in chosen and not is_done(dep.dir(ctx.study_dir)):
                raise UserError(
                    f"cell {c.id} needs {dep.id}, which is not done; run "
                    f"`condnoise study {ctx.spec.source} --stage {dep.stage}` first"
                )


class _Worker:
    """Runs ready cells one at a time, claiming each with a lock so that several workers
    (torchrun ranks, machines sharing the folder) never run the same cell twice."""

    def __init__(self, ctx: RunContext, fns: dict[str, StageFn], worker: Worker,
                 log_fn: Callable[[str], None]) -> None:  # fmt: skip
        self.ctx, self.fns, self.worker, self.log_fn = ctx, fns, worker, log_fn
        self.log = CellLog(ctx.study_dir / "cells.jsonl")

    def _done(self, cell: Cell) -> bool:
        return is_done(cell.dir(self.ctx.study_dir))

    def work_through(self, pending: list[Cell], result: StudyRun) -> None:
        total = sum(not self._done(c) for c in pending)
        while pending:
            ready = [c for c in pending if all(self._done(self.ctx.cells[d]) for d in c.deps)]
            if self._step(ready, pending, result, total):
                continue
            if self.worker.world == 1 and not ready:
                raise UserError(f"study {self.ctx.spec.name}: no runnable cell left (a dependency failed?)")
            time.sleep(poll_seconds(self.ctx.lock_timeout))  # other workers hold the ready cells

    def _step(self, ready: list[Cell], pending: list[Cell], result: StudyRun, total: int) -> bool:
        """Skip finished ready cells, run the first one this worker can claim; whether
        anything happened (then the caller re-scans: cells may have become ready)."""
        progressed = False
        for cell in ready:
            if self._done(cell):
                self.log.append("skip", cell.id, cell.key, rank=self.worker.rank)
                result.skipped.append(cell.id)
                pending.remove(cell)
                progressed = True
                continue
            cell_dir = cell.dir(self.ctx.study_dir)
            with claim(cell_dir, lock_timeout=self.ctx.lock_timeout) as lock:
                if lock is None or self._done(cell):
                    continue
                self.log_fn(f"[{len(result.ran) + 1}/{total}] {cell.id}")
                try:
                    _run_cell(cell, cell_dir, self.ctx, self.fns, self.log, self.worker, lock)
                except LockLost as e:
                    self.log_fn(f"{cell.id}: {e}")  # its new owner finishes it
                    continue
            result.ran.append(cell.id)
            pending.remove(cell)
            return True
        return progressed


def poll_seconds(lock_timeout: float) -> float:
    """How often a waiting worker looks again: 5 s, sooner for short (test) timeouts."""
    return min(POLL_SECONDS, lock_timeout / 4)


def _run_cell(
    cell: Cell, cell_dir: Path, ctx: RunContext, fns: dict[str, StageFn], log: CellLog,
    worker: Worker, lock: Lock,
) -> None:
    """Run one claimed cell and write its done marker. Its lock taken over meanwhile (this
    worker was stopped past the timeout): log ``lost`` and raise LockLost, writing nothing."""
    if cell.stage not in RESUMABLE:
        reset_cell(cell_dir)  # remove leftovers of an interrupted attempt
    cell_dir.mkdir(parents=True, exist_ok=True)
    dep_dirs = {ctx.cells[d].stage: ctx.cells[d].dir(ctx.study_dir) for d in cell.deps}
    write_provenance(cell_dir, {"cell": cell.id, **cell.config}, cell.meta.get("seed"))
    log.append("start", cell.id, cell.key, rank=worker.rank)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        info = fns[cell.stage](cell, cell_dir, dep_dirs, ctx) or {}
        lock.check()  # still ours: only the owner marks the cell done
    except BaseException as e:
        if lock.lost or isinstance(e, LockLost):  # noticed by the heartbeat or a check
            log.append("lost", cell.id, cell.key, rank=worker.rank)
            raise LockLost(f"its lock was taken over by another worker while it ran "
                           f"({type(e).__name__}); that one resumes it") from None  # fmt: skip
        log.append("fail", cell.id, cell.key, rank=worker.rank, error=f"{type(e).__name__}: {e}",
                   seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
        if not isinstance(e, UserError | KeyboardInterrupt):
            (cell_dir / "error.txt").write_text(traceback.format_exc())
        raise
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mark_done(cell_dir, {"cell": cell.id, "seconds": seconds, "cpu_seconds": cpu, "meta": cell.meta,
                         **info})  # fmt: skip
    # wall seconds (what --dry-run rescales by) and CPU-seconds of this process, all threads
    # (comparable across machine loads, unlike wall time on a shared machine)
    log.append("end", cell.id, cell.key, rank=worker.rank, seconds=round(seconds, 3),
               cpu_seconds=round(cpu, 3))  # fmt: skip


def _wait_all(cells: list[Cell], study_dir: Path) -> None:
    while not all(is_done(c.dir(study_dir)) for c in cells):
        time.sleep(POLL_SECONDS)


def run_cell(
    spec: StudySpec,
    study_dir: Path,
    cell_id: str,
    *,
    device: str | None = None,
    progress: bool = False,
    what: str = "study cell",
    on_claimed: Callable[[], None] | None = None,
    stage_fns: dict[str, StageFn] | None = None,
) -> str:
    """Run one cell (the body of a cluster job): ``done`` when it was finished already,
    ``ran`` when this call finished it.

    Its dependencies must be done (the job scheduler ensures that). A cell another worker
    holds is waited for: finished there, it is ``done``; its holder silent for the
    study's ``lock_timeout``, it is taken over and resumed here; taken over from this call
    (it was stopped past the timeout), it waits for the new owner. Still held by a live
    worker after twice the timeout: a UserError naming the holder. ``on_claimed`` runs
    once the cell is this call's (multi-task jobs start their process group there).
    """
    from condnoise.locks import read_lock
    from condnoise.study import stages as stage_module
    from condnoise.study.cache import cell_lock_path

    study_dir = Path(study_dir)
    cells = {c.id: c for c in build_cells(spec)}
    if cell_id not in cells:
        raise UserError(f"study {spec.name} has no cell {cell_id!r}")
    cell, cell_dir = cells[cell_id], cells[cell_id].dir(study_dir)
    ctx = RunContext(spec, study_dir, device, progress, cells, spec.lock_timeout)
    _check_dependencies([cell], [cell], ctx)
    log, worker = CellLog(study_dir / "cells.jsonl"), Worker()
    give_up = time.monotonic() + 2 * spec.lock_timeout
    while not is_done(cell_dir):
        with claim(cell_dir, lock_timeout=spec.lock_timeout, what=what) as lock:
            if lock is not None and not is_done(cell_dir):
                if on_claimed is not None:
                    on_claimed()
                try:
                    _run_cell(cell, cell_dir, ctx, stage_fns or stage_module.STAGE_FUNCTIONS,
                              log, worker, lock)  # fmt: skip
                    return "ran"
                except LockLost:  # stopped past the timeout: wait for the new owner
                    give_up = time.monotonic() + 2 * spec.lock_timeout
        if time.monotonic() > give_up:
            holder = read_lock(cell_lock_path(cell_dir))
            raise UserError(f"cell {cell_id} is held by {holder.describe() if holder else '?'}, "
                            "a live worker; submit it again once that one stops")  # fmt: skip
        time.sleep(poll_seconds(spec.lock_timeout))
    log.append("skip", cell.id, cell.key, rank=worker.rank)
    return "done"
