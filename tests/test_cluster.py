"""Studies at cluster scale (issue 20): cell locks with a heartbeat between real worker
processes (a stopped worker's cell is taken over and resumed, a live slow one keeps it),
`--submit local` through submitit (a killed job's cell resumed by the next submission, the
micro study's report identical to a plain run), `--status`, the sbatch plan, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from condnoise.errors import UserError
from condnoise.locks import read_lock
from condnoise.study.cache import CellLog, cell_lock_path
from condnoise.study.grid import build_cells
from condnoise.study.spec import load_study

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0  # the test-sized lock timeout (the default is 600 s)

TINY = {
    "name": "tiny",
    "data": {"source": "fashion-mnist", "image_size": 32, "max_samples": 256},
    "seeds": [0],
    "architectures": {"dit": {"family": "dit", "size": "S/8", "hidden": 32, "depth": 2, "heads": 2}},
    "variants": ["clean"],
    "train": {"train": {"steps": 120, "batch_size": 16, "lr": 1.0e-3, "ckpt_every": 10,
                        "log_every": 10, "warmup": 0, "threads": 1}},  # fmt: skip
    "sample": {"sampler": "dpm++", "steps": 4, "num_samples": 10, "guidance": [1.0]},
    "report": {"walks": False, "theory": False},
    "lock_timeout": TIMEOUT,
}


def _study(tmp_path: Path, name: str = "tiny", **changes) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def _worker(study: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``condnoise study`` as a separate process (stderr captured in a file beside ``out``)."""
    err = open(out.parent / f"{out.name}-{time.monotonic_ns()}.err", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "condnoise", "study", str(study), "--out", str(out),
         "--no-progress", *extra],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=err, cwd=out.parent,
    )  # fmt: skip
    proc.err = err  # type: ignore[attr-defined]
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    proc.err.seek(0)  # type: ignore[attr-defined]
    return proc.err.read()  # type: ignore[attr-defined]


def _train_cell(study: Path, out: Path):
    cell = next(c for c in build_cells(load_study(str(study))) if c.stage == "train")
    return cell, cell.dir(out)


def _checkpoints(cell_dir: Path) -> list[int]:
    folder = cell_dir / "run" / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*")) if folder.is_dir() else []


def _wait(cond, what: str, limit: float = 240.0) -> None:
    end = time.time() + limit
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def _metrics(cell_dir: Path) -> list[str]:
    path = cell_dir / "run" / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def _assert_resumed(cell_dir: Path, before: list[str], saved: int) -> None:
    """The run kept what was logged before the take-over (not restarted: a fresh start
    clears the run folder) and the next worker's first logged step follows checkpoint
    ``saved`` (log_every = 10). Lines logged past ``saved`` before the kill (a step logged
    whose checkpoint was not written yet) are dropped and logged again on resume."""
    after = _metrics(cell_dir)
    before = [line for line in before if json.loads(line)["step"] <= saved]
    assert before and after[: len(before)] == before
    assert json.loads(after[len(before)])["step"] == saved + 10


def test_a_stopped_worker_is_taken_over_and_its_cell_resumed(tmp_path):
    """Worker A trains the cell and is stopped (SIGSTOP) after a checkpoint; worker B waits
    for A's heartbeat to be older than the timeout, takes the cell over and resumes it from
    A's checkpoint; A, continued, notices and stops without writing."""
    study, out = _study(tmp_path), tmp_path / "s"
    cell, cell_dir = _train_cell(study, out)
    a = _worker(study, out, "--stage", "train")
    b = None
    try:
        _wait(lambda: _checkpoints(cell_dir) or a.poll() is not None, "A's first checkpoint")
        a.send_signal(signal.SIGSTOP)
        assert a.poll() is None, _stderr(a)
        saved, before = _checkpoints(cell_dir)[-1], _metrics(cell_dir)
        assert saved < 120
        b = _worker(study, out, "--stage", "train")
        assert b.wait(timeout=300) == 0, _stderr(b)
        assert "taking over the lock" in _stderr(b) and "no heartbeat" in _stderr(b)
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=120) == 0, _stderr(a)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    events = [e["event"] for e in CellLog(out / "cells.jsonl").events() if e["cell"] == cell.id]
    assert events.count("start") == 2 and events.count("end") == 1 and "lost" in events, events
    _assert_resumed(cell_dir, before, saved)  # from A's checkpoint, not from scratch
    assert json.loads((cell_dir / "done.json").read_text())["cell"] == cell.id
    assert _checkpoints(cell_dir)[-1] == 120
    assert not cell_lock_path(cell_dir).exists()


def test_a_live_worker_with_a_slow_cell_keeps_its_lock(tmp_path):
    """The cell runs for several timeouts; a second worker waiting on it never takes it
    over and skips it once the first has finished."""
    timeout, steps = 2.0, 600  # 300 steps once lasted 3.6 s, under twice the timeout
    train = {"train": {**TINY["train"]["train"], "steps": steps}}
    study, out = _study(tmp_path, lock_timeout=timeout, train=train), tmp_path / "s"
    cell, cell_dir = _train_cell(study, out)
    a = _worker(study, out, "--stage", "train")
    _wait(lambda: cell_lock_path(cell_dir).exists() or a.poll() is not None, "A's lock")
    b = _worker(study, out, "--stage", "train")
    try:
        assert a.wait(timeout=300) == 0, _stderr(a)
        assert b.wait(timeout=120) == 0, _stderr(b)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "taking over" not in _stderr(a) + _stderr(b)
    events = [e for e in CellLog(out / "cells.jsonl").events() if e["cell"] == cell.id]
    assert [e["event"] for e in events] == ["start", "end", "skip"], events
    assert events[1]["seconds"] > 2 * timeout  # the holder outlived the timeout, beating
    logged = [json.loads(line)["step"] for line in _metrics(cell_dir)]
    assert logged == list(range(10, steps + 1, 10))  # trained once, never restarted


@pytest.mark.slow
def test_a_killed_local_job_is_resumed_by_the_next_submission(tmp_path):
    """`--submit local`: the train job is SIGKILLed after a checkpoint; the submission
    reports it failed, --status shows it with its log's last line, and a second
    submission resumes the cell from that checkpoint and finishes it."""
    study, out = _study(tmp_path), tmp_path / "s"
    cell, cell_dir = _train_cell(study, out)
    first = _worker(study, out, "--stage", "train", "--submit", "local")
    try:
        _wait(lambda: _checkpoints(cell_dir) or first.poll() is not None, "the job's checkpoint")
        holder = read_lock(cell_lock_path(cell_dir))
        assert holder is not None and "local job" in holder.what, _stderr(first)
        os.kill(holder.pid, signal.SIGKILL)
        assert first.wait(timeout=120) == 1, _stderr(first)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    saved, before = _checkpoints(cell_dir)[-1], _metrics(cell_dir)
    status = subprocess.run(
        [sys.executable, "-m", "condnoise", "study", str(study), "--out", str(out), "--status"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(ln for ln in status.splitlines() if ln.startswith(cell.id))
    assert " failed " in line and "local job" in line, status
    second = _worker(study, out, "--stage", "train", "--submit", "local")
    assert second.wait(timeout=300) == 0, _stderr(second)
    _assert_resumed(cell_dir, before, saved)
    assert (cell_dir / "done.json").is_file()
    logs = list((out / "jobs" / "train" / cell.key).glob("*_log.err"))
    assert len(logs) == 2  # one log per job, in the study folder


@pytest.mark.slow
def test_a_training_job_trains_over_all_its_tasks(tmp_path):
    """gpus_per_node: 2 -> the train job runs 2 tasks (submitit's local executor) that join
    one process group (gloo on CPU, as torchrun would set it up) and train the cell once."""
    import torch

    train = {"train": {**TINY["train"]["train"], "steps": 20}}
    study = _study(tmp_path, train=train, slurm={"train": {"gpus_per_node": 2}})
    out = tmp_path / "s"
    cell, cell_dir = _train_cell(study, out)
    run = _worker(study, out, "--stage", "train", "--submit", "local")
    assert run.wait(timeout=300) == 0, _stderr(run)
    state = torch.load(cell_dir / "run" / "checkpoints" / "step_00000020" / "state.pt",
                       weights_only=False)  # fmt: skip
    assert state["world_size"] == 2
    logs = sorted(p.name for p in (out / "jobs" / "train" / cell.key).glob("*_log.out"))
    assert [n.split("_")[1] for n in logs] == ["0", "1"]  # one log per task
    events = [e["event"] for e in CellLog(out / "cells.jsonl").events()]
    assert events == ["start", "end"]  # rank 0 alone runs the cell's bookkeeping


def test_sbatch_plan_resources_dependencies_and_skips(tmp_path):
    """--dry-run --submit slurm: per-stage resources from the study's slurm section, training
    over nodes x GPUs tasks, afterok on the parents' jobs; done cells are left out."""
    from condnoise.study.submit import make_plan, sbatch_plan

    slurm = {"default": {"partition": "cpu", "time": "2:00:00", "mem": "16G"},
             "train": {"partition": "gpu", "nodes": 2, "gpus_per_node": 8, "time": "7-00:00:00",
                       "account": "proj"}}  # fmt: skip
    spec = load_study(str(_study(tmp_path, slurm=slurm)))
    text = sbatch_plan(spec, tmp_path / "s", make_plan(spec, tmp_path / "s"))
    lines = text.splitlines()
    train = next(ln for ln in lines if ln.endswith("# train/dit/clean/seed0"))
    assert train.startswith("J1=$(sbatch ")
    for flag in ("--partition=gpu", "--account=proj", "--nodes=2", "--ntasks-per-node=8",
                 "--gpus-per-node=8", "--time=10080", "--mem=16G"):  # fmt: skip
        assert flag in train, train
    sample = next(ln for ln in lines if ln.endswith("# sample/dit/clean/seed0/s1"))
    assert "--partition=cpu" in sample and "--ntasks-per-node=1" in sample
    assert "--time=120" in sample and "--dependency=afterok:$J1)" in sample
    report = next(ln for ln in lines if ln.endswith("# report"))
    assert "--dependency=afterok:$J1:$J2:$J3" in report
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --nodes=2" in text
    assert "submitit.core._submit" in text

    cell = next(c for c in build_cells(spec) if c.stage == "train")
    done_dir = cell.dir(tmp_path / "s")
    done_dir.mkdir(parents=True)
    (done_dir / "done.json").write_text("{}")
    plan = make_plan(spec, tmp_path / "s")
    assert cell.id not in [c.id for c in plan.submit]
    assert plan.waits["sample/dit/clean/seed0/s1"] == []  # its parent is done


def test_a_second_submission_skips_running_and_queued_cells(tmp_path):
    """A cell held by a live worker is `running` (skipped; its dependants wait for a later
    submission, having no job to depend on); a cell whose job is still queued is skipped
    and its dependants depend on that job; --status says so."""
    import socket

    from condnoise.io import write_json
    from condnoise.locks import Lock
    from condnoise.study.submit import JOB_FILE, job_dir, make_plan, sbatch_plan, status_text

    spec = load_study(str(_study(tmp_path, seeds=[0, 1])))
    out = tmp_path / "s"
    cells = {c.id: c for c in build_cells(spec)}
    held, queued = cells["train/dit/clean/seed0"], cells["train/dit/clean/seed1"]
    folder = job_dir(out, queued.stage, queued.key)
    folder.mkdir(parents=True)
    write_json(folder / JOB_FILE, {"engine": "local", "job_id": str(os.getpid()),
                                   "host": socket.gethostname(), "cell": queued.id})  # fmt: skip
    lock = Lock(cell_lock_path(held.dir(out)), "study cell, local job 1", heartbeat=0.5,
                stale_after=TIMEOUT)  # fmt: skip
    with lock:
        plan = make_plan(spec, out)
        status = status_text(spec, out)
        text = sbatch_plan(spec, out, plan)
    assert plan.skipped[held.id].startswith("running:")
    assert plan.skipped[queued.id].startswith("queued: local job")
    assert "waits for train/dit/clean/seed0" in plan.skipped["sample/dit/clean/seed0/s1"]
    assert plan.waits["sample/dit/clean/seed1/s1"] == [queued.id]
    assert f"--dependency=afterok:{os.getpid()})  # sample/dit/clean/seed1/s1" in text
    assert not plan.report  # a cell has no job: the report waits for a later submission
    lines = {ln.split()[0]: ln for ln in status.splitlines()[2:-1]}
    assert " running " in lines[held.id] and f"pid {os.getpid()}" in lines[held.id]
    assert " queued " in lines[queued.id] and " todo" in lines["sample/dit/clean/seed0/s1"]


FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keeps the script submitit wrote, answers like sbatch
n=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 100) + 1 ))
echo $n > "$FAKE_SLURM/count"
for last; do :; done
cp "$last" "$FAKE_SLURM/job_$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SQUEUE = """#!/bin/sh
# every recorded job is still pending
for f in "$FAKE_SLURM"/job_*.sh; do [ -e "$f" ] && basename "$f" .sh | sed 's/job_//; s/$/ PENDING/'; done
"""


def test_submit_slurm_chains_afterok_and_a_second_submission_skips_queued_jobs(
        tmp_path, monkeypatch):  # fmt: skip
    """The real submitit SlurmExecutor against stand-ins for sbatch / squeue / srun (no
    SLURM here): one job per cell, each script's afterok naming its parents' job ids, the
    report job last; submitting again finds every job queued and submits nothing."""
    from condnoise.study.submit import status_text, submit

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("srun", "#!/bin/sh\n")):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    spec = load_study(str(_study(tmp_path, slurm={"train": {"gpus_per_node": 4, "partition": "gpu"}})))
    out = tmp_path / "s"
    first = submit(spec, out, "slurm", log_fn=lambda s: None)
    ids = first.jobs
    assert list(ids) == ["train/dit/clean/seed0", "sample/dit/clean/seed0/s1",
                         "evaluate/dit/clean/seed0/s1", "report"]  # fmt: skip
    script = {cid: (tmp_path / f"job_{jid}.sh").read_text() for cid, jid in ids.items()}
    assert "#SBATCH --ntasks-per-node=4" in script["train/dit/clean/seed0"]
    assert "#SBATCH --partition=gpu" in script["train/dit/clean/seed0"]
    assert "--dependency" not in script["train/dit/clean/seed0"]
    assert f"#SBATCH --dependency=afterok:{ids['train/dit/clean/seed0']}\n" in script[
        "sample/dit/clean/seed0/s1"]  # fmt: skip
    assert f"afterok:{ids['sample/dit/clean/seed0/s1']}\n" in script["evaluate/dit/clean/seed0/s1"]
    cells = [ids[c] for c in ids if c != "report"]
    assert f"#SBATCH --dependency=afterok:{':'.join(cells)}\n" in script["report"]
    assert f"{out}/jobs/train/" in script["train/dit/clean/seed0"]  # logs in the study folder

    again = submit(spec, out, "slurm", log_fn=lambda s: None)
    assert again.jobs == {}
    assert set(again.skipped) == set(ids)
    assert all(why.startswith("queued: slurm job") for why in again.skipped.values())
    assert status_text(spec, out).count(" queued ") == 3


@pytest.mark.parametrize("slurm, needle", [
    ({"train": {"gpus": 8}}, "slurm.train: unknown key(s) ['gpus']"),
    ({"bake": {"nodes": 1}}, "slurm.bake: unknown stage"),
    ({"train": {"time": "soon"}}, "slurm.train.time 'soon' is not a SLURM time"),
    ({"train": {"nodes": 0}}, "slurm.train.nodes 0 must be an integer >= 1"),
    ({"sample": {"nodes": 2}}, "only train / distill / finetune cells run over several nodes"),
])  # fmt: skip
def test_bad_slurm_sections(tmp_path, slurm, needle):
    with pytest.raises(UserError, match=__import__("re").escape(needle)):
        load_study(str(_study(tmp_path, slurm=slurm)))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "condnoise", "study", *args],
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True)  # fmt: skip


def test_bad_submit_input_is_one_line_exit_2(tmp_path):
    study = _study(tmp_path)
    bad = _cli(str(study), "--submit", "pbs")
    assert bad.returncode == 2 and "invalid choice: 'pbs'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    key = _study(tmp_path, "bad", slurm={"train": {"gpu": 1}})
    bad = _cli(str(key), "--submit", "slurm", "--dry-run")
    assert bad.returncode == 2 and "unknown key(s) ['gpu']" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    # submitit missing: a sitecustomize that hides it from the import system
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['submitit'] = None\n")
    bad = _cli(str(study), "--submit", "slurm", env={"PYTHONPATH": f"{hide}:{REPO}"})
    assert bad.returncode == 2 and "needs the submitit package" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = _cli(str(study), "--submit", "slurm", env={"PATH": "/nonexistent"})
    assert bad.returncode == 2 and "sbatch is not on PATH" in bad.stderr


@pytest.mark.slow
def test_micro_submit_local_matches_the_plain_study(tmp_path, eval_cache):
    """`condnoise study micro --submit local` finishes the grid and writes the same results
    as a plain `condnoise study micro` (cells are deterministic on CPU); a second
    submission submits nothing but the report."""
    env = {"CONDNOISE_CACHE": str(eval_cache), "OMP_NUM_THREADS": "1"}
    # one seed, no walks / theory: the same stages and job graph in a third of the time
    small = ["--set", "seeds=[0]", "--set", "report.walks=false", "--set", "report.theory=false"]
    local, plain = tmp_path / "local", tmp_path / "plain"
    run = _cli("micro", *small, "--out", str(local), "--submit", "local", "--jobs", "2",
               "--no-progress", env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "report:" in run.stdout
    ref = _cli("micro", *small, "--out", str(plain), "--no-progress", env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for name in ("results.csv", "summary.csv"):
        assert (local / "report" / name).read_text() == (plain / "report" / name).read_text()
    status = _cli("micro", *small, "--out", str(local), "--status", env=env).stdout
    assert "16 done; report:" in status, status
    again = _cli("micro", *small, "--out", str(local), "--submit", "local", env=env)
    assert again.returncode == 0 and "1 job(s) submitted" in again.stdout, again.stdout
