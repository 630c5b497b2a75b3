"""DiT training-step and CFG-sampling throughput, with correctness checks of every fast path.

One invocation: build a DiT (XL/2 on 32x32x4 latents and 1000 classes on CUDA, a
tiny one on CPU) with CEP-U on (paper Sec. 3), measure the run's matrix-product ceiling,
then for every mode

* check it against the eager float32 path: loss and gradient relative error of one training
  step on the same inputs and the same CFG-dropout / CEP draws; max |difference| and relative
  error of DPM-Solver++ samples from the same noise;
* time the training step (forward + backward + AdamW + EMA update, latents copied from pinned
  host memory) and the 50-step DPM-Solver++ sampler with classifier-free guidance;

and print a table (mode, batch, img/s, % of the matmul ceiling, peak GiB, check) that is also
written as JSON to ``--out``. Out-of-memory is a table entry, never a crash. Exit code 0 when
every check passed, 1 when a check failed or a mode raised, 2 on bad arguments.

FLOPs are counted analytically from the model config (2 FLOP per multiply-add, matrix products
and attention only): see :func:`dit_forward_flops`; a training step costs 3x the forward.

    python benchmarks/gpu_dit.py --out gpu_dit.json              # H100: the full run (~8 min)
    python benchmarks/gpu_dit.py --quick --out /tmp/quick.json   # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _timing as tm
import torch
from torch import nn

from condnoise.errors import UserError

TRAIN_MODES = ("fp32-eager", "bf16", "bf16+compile", "bf16+compile+ckpt")
SAMPLE_MODES = ("bf16", "bf16+compile", "bf16+compile+cudagraphs")
#: relative-error limits of a fast path against the eager float32 path
TOL_FP32, TOL_BF16, TOL_SAMPLE_BF16 = 1e-4, 1e-2, 3e-2


# --------------------------------------------------------------------------- FLOP count
def dit_forward_flops(
    cfg: dict[str, Any], *, image_size: int, in_channels: int
) -> dict[str, float]:
    """Forward FLOPs per image of the DiT in ``cfg`` (resolved model config), 2 per multiply-add.

    With N = (image_size / patch)^2 tokens, hidden h, MLP width m, per block:
    ``2N(3h^2 + h^2 + 2hm)`` (QKV, projection, MLP) ``+ 4N^2 h`` (QK^T and AV) ``+ 12h^2``
    (adaLN: 6 modulation vectors from the h-dim condition). Plus patch embedding ``2N p^2 C h``,
    timestep MLP ``2(256h + h^2)``, condition projection ``2 d h`` when ``cond_dim != h``, final
    adaLN ``4h^2`` and output layer ``2N h p^2 C_out``. DiT-XL/2 at 32x32x4: 237.3 GFLOP, so a
    training step (forward + backward = 3x forward) is 711.9 GFLOP per image.
    """
    h, depth, p = cfg["hidden"], cfg["depth"], cfg["patch"]
    m = int(h * cfg["mlp_ratio"])
    n = (image_size // p) ** 2
    c_out = in_channels * (2 if cfg.get("learn_sigma") else 1)
    linear = 2 * n * (3 * h * h + h * h + 2 * h * m) + 12 * h * h
    attention = 4 * n * n * h
    embed = 2 * n * p * p * in_channels * h + 2 * (256 * h + h * h)
    if cfg["cond_dim"] != h:
        embed += 2 * cfg["cond_dim"] * h
    final = 4 * h * h + 2 * n * h * p * p * c_out
    fwd = depth * (linear + attention) + embed + final
    return {
        "forward": float(fwd),
        "attention": float(depth * attention),
        "train_step": 3.0 * fwd,
        "tokens": float(n),
    }


def sample_flops(args: argparse.Namespace, flops: dict[str, float]) -> float:
    """FLOPs per sampled image: steps x forwards per step (2 with CFG) x forward FLOPs."""
    return args.sample_steps * (1 if args.guidance in (0.0, 1.0) else 2) * flops["forward"]


# --------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    name: str
    dtype: torch.dtype | None  # autocast dtype; None = float32
    compile: bool = False
    ckpt_blocks: int = 0  # checkpoint the first k blocks (training only)
    cudagraphs: bool = False  # compile mode "reduce-overhead" (sampling, CUDA only)


def parse_train_modes(names: list[str], ckpt_blocks: list[int]) -> list[Mode]:
    out = []
    for name in names:
        if name not in TRAIN_MODES:
            raise UserError(
                f"--modes: unknown training mode {name!r}; choose from {', '.join(TRAIN_MODES)}"
            )
        if name == "bf16+compile+ckpt":
            out += [Mode(f"{name}{k}", torch.bfloat16, True, k) for k in ckpt_blocks]
        else:
            out.append(
                Mode(name, None if name == "fp32-eager" else torch.bfloat16, "compile" in name)
            )
    return out


def parse_sample_modes(names: list[str], device: torch.device) -> list[Mode]:
    out = []
    for name in names:
        if name not in SAMPLE_MODES:
            raise UserError(
                f"--sample-modes: unknown mode {name!r}; choose from {', '.join(SAMPLE_MODES)}"
            )
        if name.endswith("cudagraphs") and device.type != "cuda":
            continue  # CUDA graphs exist on CUDA only
        out.append(
            Mode(name, torch.bfloat16, "compile" in name, cudagraphs=name.endswith("cudagraphs"))
        )
    return out


class StepMarked(nn.Module):
    """Marks a new CUDA-graph generation before each call, so the sampler may keep the
    previous step's (copied) outputs while the graph's buffers are reused."""

    def __init__(self, inner: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.inner(*args)


@contextlib.contextmanager
def applied(model: nn.Module, mode: Mode, args: argparse.Namespace) -> Iterator[None]:
    """Temporarily checkpoint the first ``ckpt_blocks`` blocks (the model's own selective
    checkpointing) and swap in a compiled denoiser (the trainer compiles the denoiser too;
    CFG dropout and CEP stay eager)."""
    den = model.denoiser
    saved_k = den.checkpoint_blocks
    try:
        den.checkpoint_blocks = min(mode.ckpt_blocks, len(den.blocks))
        if mode.compile:
            torch._dynamo.reset()
            kw: dict[str, Any] = {"backend": args.compile_backend, "dynamic": False}
            if mode.cudagraphs:
                kw["mode"] = "reduce-overhead"
            elif args.compile_backend == "inductor" and args.compile_mode != "default":
                kw["mode"] = args.compile_mode
            compiled = torch.compile(den, **kw)
            model.denoiser = StepMarked(compiled) if mode.cudagraphs else compiled
        yield
    finally:
        model.denoiser = den
        den.checkpoint_blocks = saved_k


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, flush=True)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def grad_rel_err(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over all parameters together (float64 sums)."""
    num = den = 0.0
    for g, r in zip(grads, ref):
        r = r.to(g.device, torch.float64)
        num += float((g.double() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / max(den, 1e-300))


def randomize_zero_init(model: nn.Module, seed: int) -> None:
    """DiT zero-initialises adaLN and the output layer, which makes every block an identity and
    most gradients exactly zero: checks on such weights prove nothing. Draw those N(0, 0.02)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run ``fn``; an out-of-memory error becomes ``status: out of memory``, any other error
    ``status: error: ...`` (the run goes on with the next mode)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON, never swallowed
        if tm.is_oom(e):
            out = {"status": "out of memory"}
        else:
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            out = {"status": f"error: {msg}"}
            log(f"    !! {msg}")
        return out
    finally:
        tm.free_memory(device)


class Estimator:
    """Rough section times (printed before each section, next to the time it took)."""

    def __init__(
        self, args: argparse.Namespace, ceiling: float, flops: dict[str, float], depth: int
    ):
        self.args, self.ceiling, self.flops = args, ceiling, flops
        cuda = args.device.type == "cuda"
        per_28_blocks = {"inductor": 75.0 if cuda else 400.0, "aot_eager": 20.0}
        self.compile_s = per_28_blocks.get(args.compile_backend, 60.0) * max(depth, 6) / 28
        self.eff = {None: 0.05 if cuda else 0.3, torch.bfloat16: 0.35 if cuda else 0.15}

    def train(self, mode: Mode, batch: int, with_ref: bool) -> float:
        a = self.args
        work = (a.warmup + a.steps + 1 + with_ref) * batch * self.flops["train_step"]
        return work / (self.ceiling * self.eff[mode.dtype]) + self.compile_s * mode.compile

    def sample(self, mode: Mode | None, batch: int) -> float:
        a = self.args
        runs = (a.sample_repeats + 0.1) if mode else 1.05
        work = runs * batch * a.sample_steps * 2 * self.flops["forward"]
        return work / (
            self.ceiling * self.eff[mode.dtype if mode else None]
        ) + self.compile_s * 0.4 * bool(mode and mode.compile)


# --------------------------------------------------------------------------- training
def loss_and_grads(model, schedule, params, inputs, mode: Mode, seed: int):
    """One forward + backward on fixed inputs; CFG dropout and CEP draw from a reseeded RNG."""
    from condnoise.diffusion.loss import diffusion_loss

    x0, labels, t, noise = inputs
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    with autocast(x0.device, mode.dtype):
        loss = diffusion_loss(model, schedule, x0, labels, t=t, noise=noise).loss
    loss.backward()
    grads = [
        p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p)
        for p in params
    ]
    for p in params:
        p.grad = None
    return loss.detach().float(), grads


def check_inputs(batch: int, shape: tuple[int, ...], classes: int, seed: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + batch)
    x0 = torch.randn((batch, *shape), generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noise = torch.randn((batch, *shape), generator=gen)
    return tuple(v.to(device) for v in (x0, labels, t, noise))


def run_training(
    model, schedule, args, modes: list[Mode], flops, ceiling, est: Estimator
) -> list[dict]:
    from condnoise.training.ema import EMA

    device = args.device
    params = [p for p in model.parameters() if p.requires_grad]
    pin = device.type == "cuda"
    snapshot = [p.detach().to("cpu", copy=True) for p in params]
    if pin:  # fast restores between modes without a second device copy of the weights
        snapshot = [s.pin_memory() for s in snapshot]
    shape = (args.channels, args.image_size, args.image_size)
    reference: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    rows: list[dict] = []

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s, non_blocking=pin)

    def compute_reference(batch: int) -> dict[str, Any]:
        """Eager float32 loss and gradients at ``batch``; activations are recomputed (identical
        arithmetic) so that the reference fits in memory at the timing batch."""
        reference.clear()
        tm.free_memory(device)
        ref = Mode("fp32-reference", None, ckpt_blocks=len(model.denoiser.blocks))
        restore()
        inputs = check_inputs(batch, shape, args.classes, args.seed, device)
        with applied(model, ref, args):
            loss, grads = loss_and_grads(model, schedule, params, inputs, ref, args.seed)
        # kept on the host, so that they do not count in the timed modes' peak memory
        reference[batch] = (loss.cpu(), [g.cpu() for g in grads])
        return {"status": "ok"}

    for mode in modes:
        batches = args.batches[:1] if mode.name == "fp32-eager" else args.batches
        if mode.ckpt_blocks:
            batches = args.ckpt_batches
        ref_status = "ok"
        if batches[0] not in reference:
            ref_status = guarded(lambda b=batches[0]: compute_reference(b), device)["status"]
        restore()
        ema = EMA(model, 0.9999, warmup=False)
        with applied(model, mode, args):
            for bi, batch in enumerate(batches):
                e = est.train(mode, batch, with_ref=False)
                log(f"  train {mode.name:<22} batch {batch:<5} est ~{e:.0f}s ...")
                t0 = time.perf_counter()

                def one(
                    mode=mode, batch=batch, check=bi == 0, ema=ema, ref_status=ref_status
                ) -> dict[str, Any]:
                    out: dict[str, Any] = {}
                    if check and batch not in reference:
                        out["check"] = {"ok": False, "note": f"float32 reference: {ref_status}"}
                    elif check:
                        ref_loss, ref_grads = reference[batch]
                        restore()
                        inputs = check_inputs(batch, shape, args.classes, args.seed, device)
                        loss, grads = loss_and_grads(
                            model, schedule, params, inputs, mode, args.seed
                        )
                        g_err = grad_rel_err(grads, ref_grads)
                        tol = TOL_FP32 if mode.dtype is None else TOL_BF16
                        l_err = rel_err(loss.cpu(), ref_loss)
                        finite = bool(torch.isfinite(loss)) and all(
                            bool(torch.isfinite(g).all()) for g in grads
                        )
                        out["check"] = {
                            "loss_rel_err": l_err, "grad_rel_err": g_err, "tol": tol,
                            "ok": finite and l_err < tol and g_err < tol,
                        }  # fmt: skip
                        del grads
                    out.update(
                        time_train(model, schedule, params, ema, args, mode, batch, shape, pin)
                    )
                    return out

                row = {
                    "section": "train",
                    "mode": mode.name,
                    "batch": batch,
                    **guarded(one, device),
                }
                del one  # it holds the EMA copy, which must not count in the next mode's peak
                restore()
                if "img_s" in row:
                    row["tflops"] = row["img_s"] * flops["train_step"] / 1e12
                    row["pct_ceiling"] = 100 * row["img_s"] * flops["train_step"] / ceiling
                row["elapsed_s"] = time.perf_counter() - t0
                log(f"    -> {summarize(row)}  (took {row['elapsed_s']:.0f}s)")
                rows.append(row)
        del ema
        tm.free_memory(device)
    for p in params:
        p.grad = None
    return rows


def time_train(
    model, schedule, params, ema, args, mode: Mode, batch: int, shape, pin: bool
) -> dict[str, Any]:
    """Median seconds of the full training step; inputs come from pinned host memory."""
    from condnoise.diffusion.loss import diffusion_loss

    device = args.device
    gen = torch.Generator(device="cpu").manual_seed(args.seed + batch)
    xs = [torch.randn((batch, *shape), generator=gen) for _ in range(2)]
    ys = [torch.randint(0, args.classes, (batch,), generator=gen) for _ in range(2)]
    if pin:
        xs, ys = [x.pin_memory() for x in xs], [y.pin_memory() for y in ys]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        params, lr=1e-4, weight_decay=0.0, fused=fused, foreach=None if fused else True
    )
    last: list[torch.Tensor] = []

    def step(i: int) -> None:
        x0 = xs[i % 2].to(device, non_blocking=True)
        y = ys[i % 2].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(device, mode.dtype):
            loss = diffusion_loss(model, schedule, x0, y).loss
        loss.backward()
        opt.step()
        ema.update(i)
        last[:] = [loss.detach()]

    tm.reset_peak_memory(device)
    t0 = time.perf_counter()
    step(0)  # first call: compilation, optimizer state allocation
    tm.synchronize(device)
    first_s = time.perf_counter() - t0
    times = tm.time_repeats(
        lambda i: step(i + 1), device, warmup=max(args.warmup - 1, 0), repeats=args.steps
    )
    if not torch.isfinite(last[0]):
        raise RuntimeError(f"training loss is not finite ({float(last[0])}) in mode {mode.name}")
    med = tm.median(times)
    opt.zero_grad(set_to_none=True)
    return {
        "status": "ok", "img_s": batch / med, "step_ms": 1e3 * med,
        "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        "first_call_s": first_s, "peak_gib": tm.peak_memory_gib(device),
    }  # fmt: skip


# --------------------------------------------------------------------------- sampling
def run_sampling(
    model, schedule, args, modes: list[Mode], flops, ceiling, est: Estimator
) -> list[dict]:
    from condnoise.diffusion.samplers import sample

    device = args.device
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 7)
    b, nc = args.sample_batch, min(args.sample_check_batch, args.sample_batch)
    noise = torch.randn((b, args.channels, args.image_size, args.image_size), generator=gen).to(
        device
    )
    labels = torch.randint(0, args.classes, (b,), generator=gen).to(device)
    per_img = sample_flops(args, flops)

    def run(n: int, steps: int, dtype: torch.dtype | None) -> torch.Tensor:
        precision = "fp32" if dtype is None else "bf16"
        return sample(model, schedule, labels[:n], noise[:n], guidance=args.guidance,
                      sampler="dpm++", steps=steps, precision=precision)  # fmt: skip

    def timed(mode: Mode, n: int) -> tuple[dict[str, Any], torch.Tensor]:
        tm.reset_peak_memory(device)
        t0 = time.perf_counter()
        run(n, min(3, args.sample_steps), mode.dtype)  # warm-up: compile, CUDA-graph capture
        tm.synchronize(device)
        first_s = time.perf_counter() - t0
        outs: list[torch.Tensor] = []
        times = tm.time_repeats(lambda i: outs.append(run(n, args.sample_steps, mode.dtype)),
                                device, warmup=0, repeats=args.sample_repeats)  # fmt: skip
        med = tm.median(times)
        x = outs[-1].float()
        if not torch.isfinite(x).all():
            raise RuntimeError(f"sampler output is not finite in mode {mode.name}")
        info = {"status": "ok", "img_s": n / med, "run_s": med, "first_call_s": first_s,
                "peak_gib": tm.peak_memory_gib(device)}  # fmt: skip
        return info, x

    rows: list[dict] = []
    ref_mode = Mode("fp32-eager", None)
    log(
        f"  sample {'fp32-eager (reference)':<22} batch {nc:<5} est ~{est.sample(None, nc):.0f}s ..."
    )
    t0 = time.perf_counter()
    ref: list[torch.Tensor] = []

    def reference() -> dict[str, Any]:
        info, x = timed(ref_mode, nc)
        ref.append(x[:nc])
        return info

    def finish(row: dict[str, Any], t0: float) -> None:
        if "img_s" in row:
            row["tflops"] = row["img_s"] * per_img / 1e12
            row["pct_ceiling"] = 100 * row["img_s"] * per_img / ceiling
        row["elapsed_s"] = time.perf_counter() - t0
        log(f"    -> {summarize(row)}  (took {row['elapsed_s']:.0f}s)")
        rows.append(row)

    finish(
        {"section": "sample", "mode": "fp32-eager", "batch": nc, **guarded(reference, device)}, t0
    )
    for mode in modes:
        log(f"  sample {mode.name:<22} batch {b:<5} est ~{est.sample(mode, b):.0f}s ...")
        t0 = time.perf_counter()

        def one(mode=mode) -> dict[str, Any]:
            with applied(model, mode, args):
                info, x = timed(mode, b)
            if ref:
                r = ref[0]
                err = rel_err(x[:nc], r)
                info["check"] = {
                    "max_abs_diff": float((x[:nc] - r).abs().max()), "rel_err": err,
                    "ref_abs_max": float(r.abs().max()), "tol": TOL_SAMPLE_BF16,
                    "ok": err < TOL_SAMPLE_BF16, "rows": nc,
                }  # fmt: skip
            return info

        finish({"section": "sample", "mode": mode.name, "batch": b, **guarded(one, device)}, t0)
    model.train()
    return rows


# --------------------------------------------------------------------------- report
def summarize(row: dict[str, Any]) -> str:
    if "img_s" not in row:
        return row["status"]
    return f"{row['img_s']:,.1f} img/s, {row.get('pct_ceiling', float('nan')):.1f}% ceiling, {check_text(row)}"


def check_text(row: dict[str, Any]) -> str:
    c = row.get("check")
    if not c:
        return "-"
    if "note" in c:
        return f"FAIL ({c['note']})"
    verdict = "ok" if c["ok"] else "FAIL"
    if "grad_rel_err" in c:
        return f"loss {c['loss_rel_err']:.1e} grad {c['grad_rel_err']:.1e} {verdict}"
    return (
        f"rel {c['rel_err']:.1e} max|d| {c['max_abs_diff']:.1e} of {c['ref_abs_max']:.1e} {verdict}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = f"| {'section':<7} | {'mode':<24} | {'batch':>5} | {'img/s':>9} | {'% ceiling':>9} | {'peak GiB':>8} | check"
    lines = [head, "|" + "|".join("-" * n for n in (9, 26, 7, 11, 11, 10, 40))]
    for r in rows:
        ok = "img_s" in r
        lines.append(
            f"| {r['section']:<7} | {r['mode']:<24} | {r['batch']:>5} | "
            f"{tm.fmt_num(r['img_s']) if ok else r['status'][:9]:>9} | "
            f"{tm.fmt_num(r.get('pct_ceiling')) + '%' if ok else '-':>9} | "
            f"{tm.fmt_num(r.get('peak_gib'), 2) if ok else '-':>8} | "
            f"{check_text(r) if ok else r['status']}"
        )
    return "\n".join(lines)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=p.total_memory / tm.GIB, capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, cuda=torch.version.cuda)  # fmt: skip
    else:
        import platform

        info.update(
            name=platform.processor() or platform.machine(), threads=torch.get_num_threads()
        )
    return info


# --------------------------------------------------------------------------- CLI
def positive_ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a(
        "--out",
        type=Path,
        default=Path("gpu_dit.json"),
        help="JSON results file (written atomically)",
    )
    a("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    a("--model", default=None, help="DiT size T|S|B|L|XL/2|4|8; default XL/2 on CUDA, T/4 on CPU")
    a("--depth", type=int, default=None, help="override the number of blocks")
    a(
        "--image-size",
        type=int,
        default=32,
        help="latent side (32 = 256px images through the SD VAE)",
    )
    a("--channels", type=int, default=4, help="latent channels")
    a("--classes", type=int, default=None, help="number of classes; default 1000 (10 with --quick)")
    a("--gamma", type=float, default=1.0, help="CEP-U strength gamma (paper Sec. 3)")
    a(
        "--modes",
        default=",".join(TRAIN_MODES),
        help=f"training modes among {', '.join(TRAIN_MODES)}",
    )
    a(
        "--batches",
        type=positive_ints,
        default=None,
        help="training batches; default 128,256 (CUDA), 16,32 (CPU)",
    )
    a("--ckpt-blocks", type=positive_ints, default=None,
      help="blocks checkpointed by bf16+compile+ckpt (one mode per value); default depth/4")  # fmt: skip
    a("--ckpt-batches", type=positive_ints, default=None,
      help="batches of the ckpt modes; default the --batches after the first (where memory runs out)")  # fmt: skip
    a(
        "--steps",
        type=int,
        default=None,
        help="timed training steps per mode (median); default 10 CUDA, 5 CPU",
    )
    a(
        "--warmup",
        type=int,
        default=None,
        help="untimed training steps first; default 3 CUDA, 2 CPU",
    )
    a(
        "--sample-modes",
        default=",".join(SAMPLE_MODES),
        help="sampling modes (cudagraphs: CUDA only)",
    )
    a("--sample-batch", type=int, default=None, help="sampling batch; default 256 CUDA, 8 CPU")
    a("--sample-check-batch", type=int, default=None,
      help="rows compared with the float32 eager sampler (which runs at this batch); default 16 CUDA, 4 CPU")  # fmt: skip
    a(
        "--sample-steps",
        type=int,
        default=None,
        help="DPM-Solver++ steps; default 50 (4 with --quick)",
    )
    a("--sample-repeats", type=int, default=1, help="timed sampler runs (median)")
    a("--guidance", type=float, default=4.0, help="CFG scale (not 0 or 1: two forwards per step)")
    a(
        "--compile-backend",
        default=None,
        help="torch.compile backend; default inductor (aot_eager with --quick)",
    )
    a(
        "--compile-mode",
        default="default",
        help="inductor mode for training, e.g. max-autotune-no-cudagraphs",
    )
    a("--sdpa", default="auto", choices=("auto", "flash", "cudnn", "efficient", "math"),
      help="restrict scaled_dot_product_attention to one backend")  # fmt: skip
    a(
        "--ceiling-n",
        type=int,
        default=None,
        help="matmul size for the ceiling; default 8192 CUDA, 1024 CPU",
    )
    a("--no-train", action="store_true", help="skip the training section")
    a("--no-sample", action="store_true", help="skip the sampling section")
    a("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    a("--seed", type=int, default=0, help="seed of weights, inputs and noise")
    a("--quick", action="store_true",
      help="CI smoke run: T/8 with 2 blocks, 10 classes, batch 4, 2 steps, 4 sampler steps, aot_eager")  # fmt: skip
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise UserError(
            f"--device {args.device!r} is not a torch device (cuda, cuda:N, cpu)"
        ) from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda: no CUDA GPU is visible to this torch build; use --device cpu"
        )
    if args.device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device}: only cuda and cpu are supported")
    cuda = args.device.type == "cuda"
    if args.quick:
        defaults = dict(model="T/8", depth=2, classes=10, batches=[4], steps=2, warmup=1, sample_batch=4,
                        sample_check_batch=2, sample_steps=4, compile_backend="aot_eager", ceiling_n=256)  # fmt: skip
        for k, v in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    fill = {
        "model": "XL/2" if cuda else "T/4", "batches": [128, 256] if cuda else [16, 32],
        "steps": 10 if cuda else 5, "warmup": 3 if cuda else 2, "sample_batch": 256 if cuda else 8,
        "sample_check_batch": 16 if cuda else 4, "compile_backend": "inductor",
        "ceiling_n": 8192 if cuda else 1024, "classes": 1000, "sample_steps": 50,
    }  # fmt: skip
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "sample_batch", "sample_check_batch", "sample_steps", "sample_repeats",
              "image_size", "channels", "classes", "ceiling_n"):  # fmt: skip
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.ckpt_batches is None:
        args.ckpt_batches = args.batches[1:] or args.batches[-1:]
    args.train_modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sample_mode_names = [m.strip() for m in args.sample_modes.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = resolve_args(build_parser().parse_args(argv))
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    # the float32 reference is strict float32 (no TF32 in matmuls or the patch convolution)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)

    from condnoise.diffusion.schedule import NoiseSchedule
    from condnoise.io import write_json
    from condnoise.models import build_model
    from condnoise.provenance import environment

    model_cfg: dict[str, Any] = {"family": "dit", "size": args.model, "cfg_dropout": 0.1,
                                 "perturbation": {"name": "cep-u", "gamma": args.gamma}}  # fmt: skip
    if args.depth:
        model_cfg["depth"] = args.depth
    torch.manual_seed(args.seed)
    model = build_model(
        model_cfg, in_channels=args.channels, image_size=args.image_size, num_classes=args.classes
    )
    randomize_zero_init(model, args.seed)
    model = model.to(device).train()
    cfg = model.config
    if args.ckpt_blocks is None:
        args.ckpt_blocks = [max(1, cfg["depth"] // 4)]
    train_modes = parse_train_modes(args.train_modes, args.ckpt_blocks)
    sample_modes = parse_sample_modes(args.sample_mode_names, device)
    schedule = NoiseSchedule("linear", 1000)
    flops = dit_forward_flops(cfg, image_size=args.image_size, in_channels=args.channels)
    n_params = sum(p.numel() for p in model.parameters())
    dev = device_info(device)
    log(f"gpu_dit: {dev['name']} | torch {torch.__version__} | DiT-{cfg['size']} depth {cfg['depth']} "
        f"({n_params / 1e6:.1f}M params) on {args.channels}x{args.image_size}x{args.image_size}, "
        f"{args.classes} classes, CEP-U gamma {args.gamma}")  # fmt: skip
    log(
        f"  FLOP/image: forward {flops['forward'] / 1e9:.2f} G, training step {flops['train_step'] / 1e9:.2f} G"
    )

    sdpa = contextlib.nullcontext()
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}  # fmt: skip
        sdpa = sdpa_kernel([getattr(SDPBackend, names[args.sdpa])])

    ceil_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    reps = {"warmup": 20, "repeats": 100} if device.type == "cuda" else {"warmup": 2, "repeats": 10}
    ceiling = tm.matmul_ceiling(device, n=args.ceiling_n, dtype=ceil_dtype, **reps)
    log(f"  matmul ceiling ({args.ceiling_n}^3 {ceiling['dtype']}): {ceiling['tflops_median']:.2f} TFLOP/s "
        f"median, {ceiling['tflops_best']:.2f} best ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
    est = Estimator(args, ceiling["flops"], flops, cfg["depth"])
    rows: list[dict] = []
    with sdpa:
        if not args.no_train:
            total = sum(est.train(m, b, True) for m in train_modes
                        for b in (args.ckpt_batches if m.ckpt_blocks else args.batches))  # fmt: skip
            log(f"[train] {len(train_modes)} modes, est ~{total:.0f}s")
            t0 = time.perf_counter()
            rows += run_training(model, schedule, args, train_modes, flops, ceiling["flops"], est)
            log(f"[train] done in {time.perf_counter() - t0:.0f}s")
        if not args.no_sample:
            total = est.sample(None, args.sample_check_batch) + sum(
                est.sample(m, args.sample_batch) for m in sample_modes
            )
            log(
                f"[sample] DPM-Solver++ {args.sample_steps} steps, CFG {args.guidance}, est ~{total:.0f}s"
            )
            t0 = time.perf_counter()
            rows += run_sampling(model, schedule, args, sample_modes, flops, ceiling["flops"], est)
            log(f"[sample] done in {time.perf_counter() - t0:.0f}s")

    checks_ok = all(r["check"]["ok"] for r in rows if "check" in r)
    errors = [r for r in rows if r["status"].startswith("error")]
    ok = checks_ok and not errors
    config = {
        k: (str(v) if isinstance(v, torch.device | Path) else v) for k, v in vars(args).items()
    }
    result = {
        "benchmark": "gpu_dit",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ok": ok,
        "device": dev,
        "model": {
            **cfg,
            "params": n_params,
            "image_size": args.image_size,
            "channels": args.channels,
            "classes": args.classes,
        },  # fmt: skip
        "flops_per_image": {**flops, "sample": sample_flops(args, flops)},
        "ceiling": ceiling,
        "peak_memory": tm.peak_memory_kind(device),
        "tolerances": {"fp32": TOL_FP32, "bf16": TOL_BF16, "sample_bf16": TOL_SAMPLE_BF16},
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
        "config": config,
        "provenance": {"seed": args.seed, **environment()},
    }
    write_json(args.out, result)
    log("")
    log(table(rows))
    log(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED OR MODES RAISED'}; "
        f"{result['elapsed_s']:.0f}s total; JSON: {args.out}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"gpu_dit: error: {e}", file=sys.stderr)
        sys.exit(2)
