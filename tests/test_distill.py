"""Latent consistency distillation (issue 16): the consistency target and boundary scalings
against a hand computation and diffusers' LCMScheduler, students of every family starting as
their teachers, the target network never perturbed under CEP, SIGKILL + bitwise resume of
`condnoise distill lcm`, and LCM sampling (shapes, determinism, paired seeds, one forward per
step). The teacher is a real conv U-Net trained for a few steps on Fashion-MNIST 16x16."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from condnoise.diffusion.consistency import (
    LCDDraws,
    boundary_scalings,
    lcd_loss,
    solver_timesteps,
)
from condnoise.errors import UserError
from condnoise.training.checkpoint import list_checkpoints
from condnoise.training.rundir import read_metrics

TEACHER = ["data.source=fashion-mnist", "data.image_size=16", "data.max_samples=512",
           "model.family=conv-unet", "model.size=tiny", "train.steps=20", "train.batch_size=32",
           "train.lr=2e-3", "train.warmup=0", "train.ema_decay=0.9", "train.ckpt_every=20",
           "train.sample_every=0", "train.threads=1", "run.progress=false",
           "run.tensorboard=false"]  # fmt: skip
#: LCD settings of the tests: a small grid and embedding, no sample grids, tiny batches
LCD = ["train.batch_size=16", "train.sample_every=0", "train.log_every=1", "train.threads=1",
       "train.lr=1e-3"]  # fmt: skip
LCM = {"w_embed_dim": 16, "solver_steps": 10}


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A conv U-Net (tiny, v-prediction, cosine schedule) trained 20 steps on Fashion-MNIST 16x16."""
    from condnoise.training import load_config, train

    run = tmp_path_factory.mktemp("lcm") / "teacher"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config("fmnist-conv16", TEACHER), run_dir=run, device="cpu", sample_hook=None)
    finally:
        torch.set_num_threads(n)
    return run


def _student(teacher: Path, perturbation=None, overrides=()):
    from condnoise.training.distill import student_config

    return student_config(teacher, lcm=LCM, perturbation=perturbation, overrides=[*LCD, *overrides])


def _models(teacher: Path):
    """(teacher run, student copied from it, target = a copy of the student)."""
    import copy

    from condnoise.training.builders import build_model
    from condnoise.training.distill import copy_teacher_weights
    from condnoise.training.runtime import load_run

    run = load_run(teacher)
    cfg = _student(teacher)
    student = build_model(cfg, run.latent_shape, run.num_classes).eval()
    copy_teacher_weights(student, run.model)
    return run, student, copy.deepcopy(student)


# --------------------------------------------------------------------------- the maths


def test_boundary_scalings_and_grid_by_hand_and_as_lcm_scheduler():
    from diffusers import LCMScheduler

    t = torch.tensor([0, 1, 19, 999])
    c_skip, c_out = boundary_scalings(t)
    for ti, cs, co in zip(t.tolist(), c_skip.tolist(), c_out.tolist()):
        scaled = 10.0 * ti
        assert cs == pytest.approx(0.25 / (scaled**2 + 0.25), rel=1e-6)
        assert co == pytest.approx(scaled / (scaled**2 + 0.25) ** 0.5, rel=1e-6)
    assert (c_skip[0], c_out[0]) == (1.0, 0.0)  # f(x, 0) = x: the boundary condition
    sched = LCMScheduler()
    for ti, cs, co in zip(t.tolist(), c_skip.tolist(), c_out.tolist()):
        ref = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert (cs, co) == pytest.approx(ref, rel=1e-6)
    assert solver_timesteps(1000, 50).tolist() == list(range(19, 1000, 20))
    sched.set_timesteps(10, original_inference_steps=10)
    assert sched.timesteps.tolist() == solver_timesteps(1000, 10).flip(0).tolist()


def test_guidance_embedding_by_hand():
    from condnoise.models.guidance import guidance_embedding

    w = torch.tensor([0.0, 0.5, 2.0])
    emb = guidance_embedding(w, 4)  # half = 2: frequencies 1 and 1e-4, of 1000 w
    a = 1000 * w
    hand = torch.stack([torch.sin(a), torch.sin(a * 1e-4), torch.cos(a), torch.cos(a * 1e-4)], 1)
    torch.testing.assert_close(emb, hand)
    assert guidance_embedding(w, 5).shape == (3, 5) and guidance_embedding(w, 5)[:, -1].eq(0).all()


def test_consistency_target_against_a_hand_computation(teacher):
    run, student, target = _models(teacher)
    sched = run.schedule
    assert sched.prediction == "v"
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((4, 1, 16, 16), generator=g) * 2 - 1
    cond = torch.tensor([0, 3, 7, 9])
    draws = LCDDraws(index=torch.tensor([0, 1, 5, 9]), noise=torch.randn((4, 1, 16, 16), generator=g),
                     guidance=torch.tensor([1.0, 1.5, 2.0, 3.0]))  # fmt: skip
    w_cond = student.guidance_cond(draws.guidance)
    out = lcd_loss(student, run.model, target, sched, x0, cond, draws, solver_steps=10,
                   timestep_cond=w_cond)  # fmt: skip

    abar = sched.alphas_cumprod.double()
    t_s = torch.tensor([99, 199, 599, 999])  # grid k-1, 2k-1, ... with k = 100
    t_e = torch.tensor([0, 99, 499, 899])
    v = (lambda t: abar[t].sqrt().view(-1, 1, 1, 1).float(), lambda t: (1 - abar[t]).sqrt().view(-1, 1, 1, 1).float())
    a_s, s_s, a_e, s_e = v[0](t_s), v[1](t_s), v[0](t_e), v[1](t_e)
    x_s = a_s * x0 + s_s * draws.noise
    with torch.no_grad():
        out_c = run.model(x_s, t_s, cond)
        out_u = run.model(x_s, t_s, torch.full_like(cond, 10))  # the null class of 10 classes
        guided = out_u + draws.guidance.view(-1, 1, 1, 1) * (out_c - out_u)
        x0_t, eps_t = a_s * x_s - s_s * guided, s_s * x_s + a_s * guided  # v-prediction
        x_e = a_e * x0_t + s_e * eps_t  # DDIM (eta 0) to t_n
        f_target = target(x_e, t_e, cond, timestep_cond=w_cond)
        f_student = student(x_s, t_s, cond, timestep_cond=w_cond)

    def f(out_, x, t):
        scaled = 10.0 * t.double()
        c_skip = (0.25 / (scaled**2 + 0.25)).view(-1, 1, 1, 1).float()
        c_out = (scaled / (scaled**2 + 0.25).sqrt()).view(-1, 1, 1, 1).float()
        return c_skip * x + c_out * (v[0](t) * x - v[1](t) * out_)

    goal, pred = f(f_target, x_e, t_e), f(f_student, x_s, t_s)
    torch.testing.assert_close(goal[0], x_e[0])  # t_n = 0: the target is the ODE point itself
    hand = (pred - goal).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.t_start, t_s)
    torch.testing.assert_close(out.per_sample, hand, rtol=1e-4, atol=1e-6)
    huber = lcd_loss(student, run.model, target, sched, x0, cond, draws, solver_steps=10,
                     timestep_cond=w_cond, loss="huber", huber_c=0.01)  # fmt: skip
    d2 = (pred - goal).pow(2).flatten(1)
    torch.testing.assert_close(huber.per_sample, ((d2 + 1e-4).sqrt() - 0.01).mean(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family,size", [("conv-unet", "tiny"), ("unet", "tiny"), ("dit", "T/4")])
def test_every_family_gets_a_zero_guidance_projection_and_starts_as_its_teacher(family, size):
    from condnoise.models import build_model
    from condnoise.training.distill import copy_teacher_weights

    torch.manual_seed(0)
    cfg = {"family": family, "size": size, **({"hidden": 32, "depth": 1, "heads": 2} if family == "dit" else {})}
    teacher = build_model(cfg, in_channels=1, image_size=16, num_classes=10).eval()
    student = build_model({**cfg, "lcm": {"w_embed_dim": 8}}, in_channels=1, image_size=16,
                          num_classes=10).eval()  # fmt: skip
    new = copy_teacher_weights(student, teacher)
    assert len(new) == 1 and new[0].endswith(("cond_proj.weight", "w_proj.weight"))
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref = teacher(x, t, y)
        got = student(x, t, y, timestep_cond=student.guidance_cond(torch.tensor([1.0, 2.0, 7.0])))
    torch.testing.assert_close(got, ref)
    with pytest.raises(UserError, match="not an LCM student"):
        teacher.guidance_cond(torch.ones(3))


# --------------------------------------------------------------------------- distillation


def test_target_network_is_never_perturbed_even_in_training_mode(teacher, tmp_path, one_thread):
    from condnoise.training.distill import Distiller

    cfg = _student(teacher, {"name": "cep-u", "gamma": 1.0}, ["train.steps=1"])
    d = Distiller(cfg.validate(), run_dir=tmp_path / "s", device="cpu")
    d.target.train()  # the flag, not the mode, keeps the target clean
    seen: dict[str, list] = {"target": [], "student": []}

    def grab(name):
        def hook(module, args, kwargs):
            seen[name].append(args[2].pooled.detach().clone())
        return hook

    d.target.denoiser.register_forward_pre_hook(grab("target"), with_kwargs=True)
    d.model.denoiser.register_forward_pre_hook(grab("student"), with_kwargs=True)
    clean = []  # the unperturbed embedding of the target's conditions, at the time of its call

    def embed(module, args, kwargs):
        with torch.no_grad():
            clean.append(module.encoder.embed(args[2]).pooled)

    d.target.register_forward_pre_hook(embed, with_kwargs=True)
    d.run()
    assert len(seen["target"]) == 1 and len(seen["student"]) == 1
    assert d.target.perturbation.enabled is False and d.model.perturbation.enabled is True
    torch.testing.assert_close(seen["target"][0], clean[0], rtol=0, atol=0)
    clean = clean[0]
    shift = (seen["student"][0] - clean).norm(dim=1)  # CEP-U on the student's condition
    assert (shift > 0).all() and (shift < 1.0).all()
    assert read_metrics(tmp_path / "s")[0]["perturbed_fraction"] == 1.0


def _cmd(teacher: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "condnoise", "distill", "lcm", str(teacher), "--run-dir",
            str(run_dir), "--perturb", "cep-g", "--solver-steps", "10", "--w-embed-dim", "16",
            "--ckpt-every", "2", "--no-progress", *LCD, *extra]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_and_the_student_samples(teacher, tmp_path, capsys):
    steps = 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.Popen(_cmd(teacher, killed, "--max-steps", "100000"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    ref_proc = subprocess.Popen(_cmd(teacher, ref, "--max-steps", str(steps)), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list_checkpoints(killed):
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = list_checkpoints(killed)[-1]
    assert last < steps, f"the killed run got to step {last} before SIGKILL"
    assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read().decode()  # type: ignore[union-attr]
    out = subprocess.run(_cmd(teacher, killed, "--resume", "--max-steps", str(steps)), env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    a, b = read_metrics(ref), read_metrics(killed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    for name in ("model.safetensors", "ema.safetensors"):
        x = load_file(ref / "checkpoints" / f"step_{steps:08d}" / name)
        y = load_file(killed / "checkpoints" / f"step_{steps:08d}" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name

    from condnoise.app.cli import main

    gen = killed / "gen"
    assert main(["sample", str(killed), "--sampler", "lcm", "--steps", "1,4", "--num", "16",
                 "--guidance", "2", "--out", str(gen), "--no-progress"]) == 0  # fmt: skip
    for n in (1, 4):
        z = np.load(gen / f"steps{n}" / "s2" / "samples.npz")
        assert z["images"].shape == (16, 16, 16, 1) and z["labels"].tolist() == [i % 10 for i in range(16)]
    capsys.readouterr()


# --------------------------------------------------------------------------- sampling


def test_lcm_sampling_shapes_determinism_pairing_and_one_forward_per_step(teacher, one_thread):
    from condnoise.diffusion.samplers import sample
    from condnoise.diffusion.sampling import generate

    run, student, _ = _models(teacher)
    labels = np.arange(6) % 10

    def make(steps=4, batch=6, seed=0, indices=range(6), guidance=2.0):
        return generate(student, run.schedule, run.autoencoder, list(indices), labels[list(indices)],
                        shape=(1, 16, 16), guidance=guidance, sampler="lcm", steps=steps, seed=seed,
                        batch_size=batch, clip_x0=True)  # fmt: skip

    a = make()
    assert a.shape == (6, 16, 16, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, make(batch=4))  # batch-independent: per-sample generators
    np.testing.assert_array_equal(a[2:4], make(indices=[2, 3])[:])  # paired seeds by index
    assert not np.array_equal(a, make(seed=1)) and not np.array_equal(a, make(steps=1))
    np.testing.assert_array_equal(a, make(guidance=3.0))  # a fresh student: zero projection
    with torch.no_grad():  # as after distillation: the guidance embedding reaches the output
        student.denoiser.net.time_embedding.cond_proj.weight.normal_(0, 0.1)
    assert not np.array_equal(a, make(guidance=3.0))

    calls = []
    handle = student.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0].shape[0], kw)),
                                               with_kwargs=True)  # fmt: skip
    x = sample(student, run.schedule, torch.tensor([1, 2, 3]), torch.randn(3, 1, 16, 16),
               guidance=2.5, sampler="lcm", steps=4)  # fmt: skip
    handle.remove()
    assert x.shape == (3, 1, 16, 16)
    assert [b for b, _ in calls] == [3, 3, 3, 3]  # one forward per step, no unconditional half
    assert all(kw["timestep_cond"].shape == (3, 16) for _, kw in calls)
    with pytest.raises(UserError, match="LCM student"):
        sample(run.model, run.schedule, torch.tensor([1]), torch.randn(1, 1, 16, 16), guidance=2.0,
               sampler="lcm", steps=4)  # fmt: skip
    with pytest.raises(UserError, match="at most 10"):
        sample(student, run.schedule, torch.tensor([1]), torch.randn(1, 1, 16, 16), guidance=2.0,
               sampler="lcm", steps=11)  # fmt: skip


def test_student_config_refuses_what_breaks_the_copy(teacher):
    with pytest.raises(UserError, match="model.channels"):
        _student(teacher, overrides=["model.channels=[16,16]"])
    with pytest.raises(UserError, match="diffusion.prediction"):
        _student(teacher, overrides=["diffusion.prediction=eps"])
    with pytest.raises(UserError, match="choose one of none, cep-u, cep-g"):
        _student(teacher, {"name": "dropout"})
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        from condnoise.training.distill import student_config

        student_config(teacher, distill={"teacher_step": 7})
    cfg = _student(teacher)
    assert cfg.distill.teacher == str(teacher.resolve()) and cfg.distill.teacher_step == 20
    assert cfg.model.cfg_dropout == 0.0 and cfg.train.ema_decay == 0.95
    assert cfg.train.sample_sampler == "lcm"
    from condnoise.training import train

    with pytest.raises(UserError, match="condnoise distill"):
        train(cfg)


def test_a_cep_teacher_distils_as_is(teacher, tmp_path):
    """A teacher pre-trained with CEP (here: the same weights under a cep-u config; CEP has no
    parameters) is used in eval mode, unperturbed; the student's perturbation is its own."""
    import shutil

    from condnoise.training.runtime import load_run

    cep = tmp_path / "cep-teacher"
    shutil.copytree(teacher, cep)
    text = (cep / "config.yaml").read_text()
    (cep / "config.yaml").write_text(text.replace("perturbation:\n    name: none", "perturbation:\n    name: cep-u\n    gamma: 1.0"))
    run, plain = load_run(cep), load_run(teacher)
    assert run.model.perturbation.name == "cep-u" and not run.model.training
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(run.model(x, t, y), plain.model(x, t, y), rtol=0, atol=0)
    assert _student(cep).model.perturbation == {"name": "none"}
    both = _student(cep, {"name": "cep-u", "gamma": 0.5})
    assert both.model.perturbation == {"name": "cep-u", "gamma": 0.5}
