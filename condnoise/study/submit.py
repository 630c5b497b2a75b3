"""Hand a study's cells to a job engine through submitit: SLURM, or local processes.

One job per cell that is not finished and not running (or queued) already, with the
resources of its stage (:mod:`condnoise.study.slurm`). Dependencies:

- ``slurm``: the whole graph is submitted at once, each job with an sbatch
  ``--dependency=afterok:`` on the jobs of the cells it needs (queued, running or just
  submitted), and a last job writes the report once every cell job succeeded. The command
  returns after submitting: a cluster schedules weeks of work without a process that has
  to stay alive. A job succeeds only when its cell is done, so ``afterok`` holds a
  dependant back until its inputs exist; a failed job leaves its dependants pending as
  ``DependencyNeverSatisfied`` (cancel them, fix, submit again).
- ``local``: submitit's ``LocalExecutor`` has no dependencies, so the command submits
  cells in waves as their parents finish (at most ``jobs`` at once), waits, and submits
  the report job last.

Each job runs :func:`cell_job`: the cell under its heartbeat lock
(:func:`condnoise.study.runner.run_cell`), so a cell stopped, killed or lost with its
node is taken over by the next job for it and resumed from its last checkpoint. A
training job with ``gpus_per_node`` G on ``nodes`` N runs N x G tasks; submitit exports
the variables torchrun would set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and the trainer joins one process group over the
allocation. Job files and logs: ``STUDY_DIR/jobs/{stage}/{key}/`` (``job.json``, the
engine's ``{job}_0_log.out`` / ``.err``); a submission that skips a cell says why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condnoise.errors import UserError
from condnoise.io import read_json, write_json
from condnoise.locks import read_lock, stale_reason
from condnoise.study.cache import CellLog, cell_lock_path, is_done, now_utc
from condnoise.study.grid import Cell, build_cells, select
from condnoise.study.slurm import executor_parameters, resources, tasks_per_node, time_minutes
from condnoise.study.spec import StudySpec

ENGINES = ("slurm", "local")
JOBS_DIR = "jobs"
JOB_FILE = "job.json"
REPORT_ID = "report"
ACTIVE_SLURM = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                "SUSPENDED", "STAGE_OUT", "SIGNALING"}  # fmt: skip


def submitit_module() -> Any:
    try:
        import submitit
    except ImportError:
        raise UserError("--submit needs the submitit package (pip install submitit)") from None
    return submitit


def job_dir(study_dir: Path, stage: str, key: str) -> Path:
    return Path(study_dir) / JOBS_DIR / stage / key


# --------------------------------------------------------------------------- job bodies


def _job_tasks() -> tuple[int, int, str]:
    """(tasks, global rank, job id) of the submitit job this process runs in."""
    env = submitit_module().JobEnvironment()
    return env.num_tasks, env.global_rank, str(env.job_id)


def cell_job(spec: StudySpec, study_dir: str, cell_id: str, engine: str,
             device: str | None = None) -> str:  # fmt: skip
    """One cluster job: run the cell (``done`` / ``ran``, see :func:`runner.run_cell`).

    Multi-task jobs (training over an allocation): rank 0 claims the cell, then every task
    joins the process group and learns whether to train; the other ranks run the train
    stage alone (rank 0 keeps the lock, the log and the done marker).
    """
    from condnoise.study.runner import run_cell

    ntasks, rank, job_id = _job_tasks()
    what = f"study cell, {engine} job {job_id}"
    if ntasks == 1:
        return run_cell(spec, Path(study_dir), cell_id, device=device, what=what)
    submitit_module().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if rank != 0:
        return _follow(spec, Path(study_dir), cell_id, device)
    shared: list[bool] = []

    def share(go: bool) -> None:
        if not shared:
            shared.append(_broadcast(device, go))

    try:
        status = run_cell(spec, Path(study_dir), cell_id, device=device, what=what,
                          on_claimed=lambda: share(True))  # fmt: skip
    finally:
        share(False)  # done already, or failed before training: release the other ranks
    return status


def _broadcast(device: str | None, go: bool | None) -> bool:
    from condnoise.training.runtime import broadcast_object, init_distributed

    return bool(broadcast_object(init_distributed(device), go))


def _follow(spec: StudySpec, study_dir: Path, cell_id: str, device: str | None) -> str:
    """A rank > 0 of a multi-task job: train with rank 0 if it claimed the cell."""
    from condnoise.study import stages
    from condnoise.study.runner import RunContext

    if not _broadcast(device, None):
        return "follower: nothing to do"
    cells = {c.id: c for c in build_cells(spec)}
    cell = cells[cell_id]
    ctx = RunContext(spec, study_dir, device, False, cells, spec.lock_timeout)
    deps = {cells[d].stage: cells[d].dir(study_dir) for d in cell.deps}
    stages.STAGE_FUNCTIONS[cell.stage](cell, cell.dir(study_dir), deps, ctx)
    return "follower: ran"


def report_job(spec: StudySpec, study_dir: str) -> str:
    """The last job: write the report (every cell is done when it starts)."""
    from condnoise.study.report import write_report

    return str(write_report(spec, Path(study_dir), log_fn=lambda s: None))


# --------------------------------------------------------------------------- state


@dataclass
class CellState:
    """What ``--status`` says about a cell: done / running / queued / failed / todo."""

    state: str
    detail: str = ""
    job_id: str | None = None  # the engine's job for it, while queued or running


def _job_record(folder: Path) -> dict[str, Any] | None:
    try:
        return read_json(folder / JOB_FILE) if (folder / JOB_FILE).is_file() else None
    except UserError:
        return None


def _slurm_queue() -> dict[str, str] | None:
    """This user's SLURM jobs and their states (None when squeue is not available)."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "-h", "-u", os.environ.get("USER", ""), "-o", "%i %T"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    return dict(line.split(None, 1) for line in out.splitlines() if " " in line)


def _active(record: dict[str, Any], queue: dict[str, str] | None) -> str | None:
    """The engine state of a job record while it is queued or running, else None."""
    if record["engine"] == "local":
        if record.get("host") != socket.gethostname():
            return None
        try:
            os.kill(int(record["job_id"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "RUNNING"
    if queue is None:
        return "UNKNOWN"  # no squeue here: assume it may still run
    state = queue.get(str(record["job_id"]))
    return state if state in ACTIVE_SLURM else None


def last_log_line(folder: Path) -> str:
    """The last non-empty line of the newest job log in ``folder`` (stderr, else stdout)."""
    logs = sorted(folder.glob("*_log.err"), key=lambda p: p.stat().st_mtime)
    logs += sorted(folder.glob("*_log.out"), key=lambda p: p.stat().st_mtime)
    for log in reversed(logs[: len(logs)]):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:200]
    return "(no log line)"


def cell_state(cell: Cell, study_dir: Path, lock_timeout: float,
               queue: dict[str, str] | None, failures: dict[str, str]) -> CellState:  # fmt: skip
    """Done, running (a live lock: where, and for how long), queued (an engine job not
    started yet), failed (its job ended without finishing it: the log's last line, or
    the error the cell log recorded), else todo."""
    cell_dir = cell.dir(study_dir)
    if is_done(cell_dir):
        return CellState("done")
    record = _job_record(job_dir(study_dir, cell.stage, cell.key))
    active = _active(record, queue) if record else None
    holder = read_lock(cell_lock_path(cell_dir))
    if holder is not None and stale_reason(holder, lock_timeout) is None:
        job = record["job_id"] if record and active and record["job_id"] in holder.what else None
        return CellState("running", f"{holder.describe()}", job)
    if record and active:
        return CellState("queued", f"{record['engine']} job {record['job_id']} ({active})",
                         str(record["job_id"]))  # fmt: skip
    if record:
        folder = job_dir(study_dir, cell.stage, cell.key)
        return CellState("failed", f"{record['engine']} job {record['job_id']}: "
                         f"{last_log_line(folder)}")  # fmt: skip
    if cell.id in failures:
        return CellState("failed", failures[cell.id])
    return CellState("todo")


def _failures(study_dir: Path) -> dict[str, str]:
    """Cells whose latest cell-log event is a failure, with its error."""
    last: dict[str, dict[str, Any]] = {}
    for e in CellLog(study_dir / "cells.jsonl").events():
        last[e["cell"]] = e
    return {c: str(e.get("error", "failed"))[:200] for c, e in last.items() if e["event"] == "fail"}


def states(spec: StudySpec, study_dir: Path, cells: list[Cell]) -> dict[str, CellState]:
    queue = _slurm_queue() if any(_job_record(job_dir(study_dir, c.stage, c.key))
                                  for c in cells) else None  # fmt: skip
    failures = _failures(study_dir)
    return {c.id: cell_state(c, study_dir, spec.lock_timeout, queue, failures) for c in cells}


def status_text(spec: StudySpec, study_dir: Path, *, stages=None, only=None) -> str:
    """``--status``: one line per cell, then the count per state."""
    cells = [c for c in select(build_cells(spec), stages=stages, only=only) if c.stage != "report"]
    found = states(spec, study_dir, cells)
    lines = [f"study {spec.name} -> {study_dir}", f"{'cell':<46} {'state':<8} where / why"]
    lines += [f"{c.id:<46} {found[c.id].state:<8} {found[c.id].detail}".rstrip() for c in cells]
    counts: dict[str, int] = {}
    for s in found.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    report = Path(study_dir) / "report" / "report.html"
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                 + (f"; report: {report}" if report.is_file() else "; no report yet"))  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What a submission does: cells to submit (in dependency order) with the plan entries
    they wait for, cells skipped with the reason, and whether the report job follows."""

    submit: list[Cell] = field(default_factory=list)
    waits: dict[str, list[str]] = field(default_factory=dict)  # cell id -> cell ids it waits on
    known_jobs: dict[str, str] = field(default_factory=dict)  # cell id -> queued/running job id
    skipped: dict[str, str] = field(default_factory=dict)  # cell id -> why not submitted
    report: bool = False
    pending_report: list[str] = field(default_factory=list)  # cells the report job waits on


def make_plan(spec: StudySpec, study_dir: Path, *, stages=None, only=None) -> Plan:
    """Decide every selected cell: done or running / queued: skipped; a dependency that
    is neither done nor has a job (running outside the engine, or failed upstream): held
    back; otherwise submitted, waiting on its dependencies' jobs."""
    chosen = select(build_cells(spec), stages=stages, only=only)
    cells = [c for c in chosen if c.stage != "report"]
    found = states(spec, study_dir, cells)
    by_id = {c.id: c for c in build_cells(spec)}
    plan = Plan()
    for c in cells:
        st = found[c.id]
        if st.state == "done":
            continue
        if st.state in ("running", "queued"):
            plan.skipped[c.id] = f"{st.state}: {st.detail}"
            if st.job_id:
                plan.known_jobs[c.id] = st.job_id
            continue
        waits, missing = [], []
        for d in c.deps:
            if is_done(by_id[d].dir(study_dir)):
                continue
            if d in plan.known_jobs or any(x.id == d for x in plan.submit):
                waits.append(d)
            else:
                missing.append(d)
        if missing:
            plan.skipped[c.id] = f"waits for {', '.join(missing)} (not done, no job: submit again later)"
            continue
        plan.submit.append(c)
        plan.waits[c.id] = waits
    wanted = not stages or "report" in stages
    open_cells = [c.id for c in cells if found[c.id].state != "done"]
    plan.report = wanted and not (set(open_cells) - set(plan.known_jobs) - set(plan.waits))
    record = _job_record(job_dir(study_dir, REPORT_ID, REPORT_ID))
    active = _active(record, _slurm_queue()) if record and plan.report else None
    if active and not plan.submit:  # the report job of an earlier submission still waits
        plan.report = False
        plan.skipped[REPORT_ID] = f"queued: {record['engine']} job {record['job_id']} ({active})"
    plan.pending_report = [c for c in open_cells if c in plan.known_jobs or c in plan.waits]
    return plan


def _params(spec: StudySpec, stage: str) -> dict[str, Any]:
    return executor_parameters(stage, resources(spec.slurm, stage))


def sbatch_plan(spec: StudySpec, study_dir: Path, plan: Plan) -> str:
    """``--dry-run --submit slurm``: one sbatch line per job (dependencies as $J<n> of the
    jobs above, or the id of a queued / running job) and each stage's sbatch script."""
    submitit_module()
    from submitit.slurm.slurm import _make_sbatch_string  # the text submitit would submit

    ref = dict(plan.known_jobs)
    lines = [f"study {spec.name} -> {study_dir}: {len(plan.submit)} job(s) to submit"
             + (" + the report job" if plan.report else "")]  # fmt: skip
    for n, c in enumerate(plan.submit, 1):
        ref[c.id] = f"$J{n}"
        lines.append(f"J{n}=$(sbatch {_flags(_params(spec, c.stage))}"
                     f"{_dependency([ref[d] for d in plan.waits[c.id]])})  # {c.id}")  # fmt: skip
    if plan.report:
        lines.append(f"sbatch {_flags(_params(spec, 'report'))}"
                     f"{_dependency([ref[c] for c in plan.pending_report])}  # report")  # fmt: skip
    for cid, why in plan.skipped.items():
        lines.append(f"# not submitted: {cid}: {why}")
    for stage in dict.fromkeys(c.stage for c in plan.submit):
        folder = job_dir(study_dir, stage, "KEY")
        text = _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}",
                                   folder=str(folder), job_name=f"{spec.name}-{stage}",
                                   **_params(spec, stage))  # fmt: skip
        lines += ["", f"# sbatch script of a {stage} job:", text.strip()]
    return "\n".join(lines)



def _flags(params: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')}={v}" for k, v in params.items())


def _dependency(ids: list[str]) -> str:
    return f" --dependency=afterok:{':'.join(ids)}" if ids else ""


# --------------------------------------------------------------------------- submitting


@dataclass
class Submission:
    """What ``submit`` did."""

    jobs: dict[str, str] = field(default_factory=dict)  # cell id (or "report") -> job id
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # local: cell id -> log's last line
    report: Path | None = None


def _executor(engine: str, spec: StudySpec, stage: str, folder: Path,
              dependency: list[str]) -> Any:  # fmt: skip
    submitit = submitit_module()
    params = _params(spec, stage)
    if engine == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=params["time"], gpus_per_node=params.get("gpus_per_node", 0),
                             tasks_per_node=params["ntasks_per_node"])  # fmt: skip
        return ex
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(job_name=f"{spec.name}-{stage}", **params,
                         **({"dependency": _dependency(dependency).split("=", 1)[1]}
                            if dependency else {}))  # fmt: skip
    return ex


def _submit_one(engine: str, spec: StudySpec, study_dir: Path, cell: Cell | None,
                dependency: list[str], device: str | None) -> Any:  # fmt: skip
    stage, key = (cell.stage, cell.key) if cell else (REPORT_ID, REPORT_ID)
    folder = job_dir(study_dir, stage, key)
    folder.mkdir(parents=True, exist_ok=True)
    ex = _executor(engine, spec, stage, folder, dependency)
    if cell is None:
        job = ex.submit(report_job, spec, str(study_dir))
    else:
        job = ex.submit(cell_job, spec, str(study_dir), cell.id, engine, device)
    write_json(folder / JOB_FILE, {"engine": engine, "job_id": str(job.job_id),
                                   "cell": cell.id if cell else REPORT_ID,
                                   "submitted_utc": now_utc(), "host": socket.gethostname(),
                                   "depends_on": dependency})  # fmt: skip
    return job


def submit(spec: StudySpec, study_dir: Path, engine: str, *, stages=None, only=None,
           device: str | None = None, jobs: int = 1,
           log_fn: Callable[[str], None] = print) -> Submission:  # fmt: skip
    """Submit the plan (:func:`make_plan`) to ``engine`` (``slurm``: all at once with
    afterok dependencies; ``local``: in waves, waiting, ``jobs`` at a time)."""
    if engine not in ENGINES:
        raise UserError(f"--submit {engine!r}: unknown engine; choose from {', '.join(ENGINES)}")
    submitit_module()
    if engine == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--submit slurm: sbatch is not on PATH; run it on a SLURM login node "
                        "(or use --submit local)")  # fmt: skip
    from condnoise.study.runner import write_study_files

    write_study_files(spec, study_dir)
    plan = make_plan(spec, study_dir, stages=stages, only=only)
    result = Submission(skipped=dict(plan.skipped))
    for cid, why in plan.skipped.items():
        log_fn(f"skip {cid}: {why}")
    if engine == "slurm":
        _submit_slurm(spec, study_dir, plan, device, result, log_fn)
    else:
        _submit_local(spec, study_dir, plan, device, max(1, jobs), result, log_fn)
    return result


def _submit_slurm(spec: StudySpec, study_dir: Path, plan: Plan, device: str | None,
                  result: Submission, log_fn: Callable[[str], None]) -> None:  # fmt: skip
    ids = dict(plan.known_jobs)
    for c in plan.submit:
        job = _submit_one("slurm", spec, study_dir, c, [ids[d] for d in plan.waits[c.id]], device)
        ids[c.id] = result.jobs[c.id] = str(job.job_id)
        log_fn(f"submitted {c.id}: slurm job {job.job_id}")
    if plan.report:
        job = _submit_one("slurm", spec, study_dir, None, [ids[c] for c in plan.pending_report],
                          device)  # fmt: skip
        result.jobs[REPORT_ID] = str(job.job_id)
        log_fn(f"submitted the report: slurm job {job.job_id}")


def _submit_local(spec: StudySpec, study_dir: Path, plan: Plan, device: str | None, jobs: int,
                  result: Submission, log_fn: Callable[[str], None]) -> None:  # fmt: skip
    """Waves: submit cells whose dependencies are done, ``jobs`` at a time; a cell whose
    dependency failed (or ended unfinished elsewhere) is held back; the report job runs
    last when every cell is done."""
    waiting, running = list(plan.submit), {}
    by_id = {c.id: c for c in build_cells(spec)}
    while waiting or running:
        for cid, job in list(running.items()):
            if job.done():
                del running[cid]
                if not is_done(by_id[cid].dir(study_dir)):
                    folder = job_dir(study_dir, by_id[cid].stage, by_id[cid].key)
                    result.failed[cid] = last_log_line(folder)
                    log_fn(f"failed {cid}: {result.failed[cid]}")
        for c in list(waiting):
            if len(running) >= jobs:
                break
            open_deps = [d for d in c.deps if not is_done(by_id[d].dir(study_dir))]
            blocked = [d for d in open_deps if d not in running and not any(
                x.id == d for x in waiting) and not _alive(by_id[d], spec, study_dir)]  # fmt: skip
            if blocked:
                waiting.remove(c)
                result.skipped[c.id] = f"needs {', '.join(blocked)}, which did not finish"
                log_fn(f"skip {c.id}: {result.skipped[c.id]}")
            elif not open_deps:
                waiting.remove(c)
                running[c.id] = _submit_one("local", spec, study_dir, c, [], device)
                result.jobs[c.id] = str(running[c.id].job_id)
                log_fn(f"[{len(result.jobs)}/{len(plan.submit)}] {c.id}: local job "
                       f"{running[c.id].job_id}")  # fmt: skip
        time.sleep(0.3)
    _local_report(spec, study_dir, plan, device, result, log_fn)


def _alive(cell: Cell, spec: StudySpec, study_dir: Path) -> bool:
    """Whether a cell not run by this submission is running or queued elsewhere."""
    state = cell_state(cell, study_dir, spec.lock_timeout, None, {})
    return state.state in ("running", "queued")


def _local_report(spec: StudySpec, study_dir: Path, plan: Plan, device: str | None,
                  result: Submission, log_fn: Callable[[str], None]) -> None:  # fmt: skip
    cells = [c for c in build_cells(spec) if c.id in plan.waits or c.id in plan.known_jobs]
    if not plan.report or result.failed or not all(is_done(c.dir(study_dir)) for c in cells):
        return
    job = _submit_one("local", spec, study_dir, None, [], device)
    result.jobs[REPORT_ID] = str(job.job_id)
    try:
        result.report = Path(job.result())
    except Exception:  # noqa: BLE001 - the job's own error is in its log
        result.failed[REPORT_ID] = last_log_line(job_dir(study_dir, REPORT_ID, REPORT_ID))


__all__ = ["ENGINES", "cell_job", "make_plan", "report_job", "sbatch_plan", "status_text",
           "submit", "time_minutes", "tasks_per_node"]
