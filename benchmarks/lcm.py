"""Issue 16's acceptance measurement in one run: a 4-step LCM student against its teacher's
DPM-Solver++ at 4 steps (classifier-FID and condition accuracy on Fashion-MNIST 16 x 16).

The teacher is the ``fmnist-conv16`` preset (conv U-Net xs, v-prediction, cosine schedule),
trained by ``condnoise.training.train``; each student (``--students none,cep-u``: CEP on the
student's condition or not) is distilled from it by ``condnoise.training.distill``. Every
model is then sampled with the same seed (paired noise and classes, ``--num`` balanced
samples, guidance ``--guidance``): the teacher with ``dpm++`` at each of ``--steps``, the
students with ``lcm``, and scored by ``condnoise.evaluation.evaluate_samples`` (fmnist-classifier
FID on its 128-d features, condition accuracy). Runs are resumable (finished runs are kept:
rerun the same command). Prints a table and writes ``OUT/lcm.json``; CPU-seconds are
``time.process_time()`` of this process (all threads)::

    nice -n 5 python benchmarks/lcm.py --out /tmp/lcm-bench                 # the measurement
    python benchmarks/lcm.py --quick --out /tmp/lcm-q                        # smoke form
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL = {"teacher_steps": 400, "distill_steps": 300, "distill_batch": 64, "num": 1000, "max_ref": None,
        "shrinkage": 0.0}  # fmt: skip
QUICK = {"teacher_steps": 10, "distill_steps": 3, "distill_batch": 16, "num": 50, "max_ref": 500,
         "shrinkage": 0.5}  # 50 samples: a shrunk covariance (a smoke test, not a measurement)


def teacher_run(out: Path, s: dict[str, Any]) -> Path:
    """The fmnist-conv16 teacher (trained, or resumed to ``teacher_steps``)."""
    from condnoise.training import load_config, train
    from condnoise.training.checkpoint import list_checkpoints

    run = out / "teacher"
    steps = s["teacher_steps"]
    overrides = [f"train.steps={steps}", f"train.ckpt_every={steps}", "train.sample_every=0",
                 "run.progress=false", "run.tensorboard=false"]  # fmt: skip
    if s is QUICK:
        overrides += ["data.max_samples=512", "train.batch_size=32", "model.size=tiny"]
    if steps not in list_checkpoints(run):
        train(load_config("fmnist-conv16", overrides), run_dir=run, resume=run.exists(), sample_hook=None)
    return run


def student_run(out: Path, teacher: Path, perturb: str, s: dict[str, Any]) -> Path:
    """An LCM student of ``teacher`` (CEP ``perturb`` on its condition), distilled to ``distill_steps``."""
    from condnoise.training.checkpoint import list_checkpoints
    from condnoise.training.distill import distill, student_config

    run = out / f"student-{perturb}"
    steps = s["distill_steps"]
    pert = {"name": perturb, **({"gamma": 1.0} if perturb != "none" else {})}
    cfg = student_config(teacher, perturbation=pert, overrides=[
        f"train.steps={steps}", f"train.ckpt_every={steps}", f"train.batch_size={s['distill_batch']}",
        "train.sample_every=0", "run.progress=false", "run.tensorboard=false"])  # fmt: skip
    if steps not in list_checkpoints(run):
        distill(cfg, run_dir=run, resume=run.exists(), sample_hook=None)
    return run


def score(run_dir: Path, sampler: str, steps: int, guidance: float, s: dict[str, Any]) -> dict[str, Any]:
    """Sample ``num`` balanced images (seed 0) and score them with the fmnist-classifier."""
    import numpy as np

    from condnoise.diffusion.sampling import generate
    from condnoise.diffusion.seeding import requested_labels
    from condnoise.evaluation.evaluate import EvalConfig, Samples, evaluate_samples
    from condnoise.training.runtime import load_run

    run = load_run(run_dir)
    labels = requested_labels(0, range(s["num"]), run.num_classes, "balanced")
    c0 = time.process_time()
    images = generate(run.model, run.schedule, run.autoencoder, range(s["num"]), labels,
                      shape=run.latent_shape, guidance=guidance, sampler=sampler, steps=steps, seed=0,
                      batch_size=500, clip_x0=True)  # fmt: skip
    cpu = time.process_time() - c0
    cfg = EvalConfig(metrics=("fid", "condition-accuracy"), max_ref=s["max_ref"], shrinkage=s["shrinkage"])
    rec = evaluate_samples(Samples(Path("."), images, np.asarray(labels)), cfg).record["metrics"]
    return {"model": run_dir.name, "sampler": sampler, "steps": steps, "guidance": guidance,
            "fid": rec["fid"]["fmnist-classifier"], "accuracy": rec["condition_accuracy"]["fmnist-classifier"],
            "sample_cpu_seconds": round(cpu, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs and lcm.json")
    p.add_argument("--students", default="none,cep-u", help="student perturbations (none, cep-u, cep-g)")
    p.add_argument("--steps", default="1,2,4,8", help="sampler steps to compare")
    p.add_argument("--guidance", type=float, default=2.0, help="CFG scale s (students: their embedding)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke form: tiny teacher, a few steps, 50 samples")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    steps = [int(v) for v in args.steps.split(",")]
    c0 = time.process_time()
    teacher = teacher_run(args.out, s)
    students = [student_run(args.out, teacher, name, s) for name in args.students.split(",")]
    rows = [score(teacher, "dpm++", n, args.guidance, s) for n in steps]
    rows += [score(run, "lcm", n, args.guidance, s) for run in students for n in steps]
    print(f"{'model':<18} {'sampler':<7} {'steps':>5} {'FID':>8} {'accuracy':>9}")
    for r in rows:
        print(f"{r['model']:<18} {r['sampler']:<7} {r['steps']:>5} {r['fid']:>8.2f} {r['accuracy']:>9.3f}")
    verdict = {}
    if 4 in steps:
        t4 = next(r["fid"] for r in rows if r["model"] == "teacher" and r["steps"] == 4)
        for run in students:
            f4 = next(r["fid"] for r in rows if r["model"] == run.name and r["steps"] == 4)
            verdict[run.name] = {"student_fid_4": f4, "teacher_dpmpp_fid_4": t4, "better": f4 < t4}
            print(f"{run.name}: 4-step FID {f4:.2f} vs teacher DPM-Solver++ 4 steps {t4:.2f}: "
                  f"{'better' if f4 < t4 else 'not better'}")  # fmt: skip
    result = {"settings": {**s, "guidance": args.guidance, "quick": args.quick}, "rows": rows,
              "acceptance": verdict, "cpu_seconds": round(time.process_time() - c0, 1)}  # fmt: skip
    (args.out / "lcm.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
