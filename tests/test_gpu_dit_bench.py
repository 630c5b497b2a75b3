"""benchmarks/gpu_dit.py: the CPU smoke run, the FLOP formula, OOM reporting and the checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _timing as tm  # noqa: E402
import gpu_dit  # noqa: E402

from condnoise.diffusion.schedule import NoiseSchedule  # noqa: E402
from condnoise.errors import UserError  # noqa: E402
from condnoise.models import build_model, resolve_model_config  # noqa: E402


def test_quick_cpu_run_writes_json_and_passes_checks(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_dit.py"), "--quick", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| section | mode" in proc.stdout and "all checks passed" in proc.stdout
    res = json.loads(out.read_text())
    assert res["ok"] is True and res["device"]["type"] == "cpu"
    assert res["ceiling"]["flops"] > 0 and res["ceiling"]["dtype"] == "float32"
    fl = res["flops_per_image"]
    assert fl["train_step"] == pytest.approx(3 * fl["forward"])
    assert fl["sample"] == pytest.approx(4 * 2 * fl["forward"])  # 4 DPM-Solver++ steps, CFG
    rows = {(r["section"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {
        ("train", "fp32-eager"), ("train", "bf16"), ("train", "bf16+compile"),
        ("train", "bf16+compile+ckpt1"), ("sample", "fp32-eager"), ("sample", "bf16"),
        ("sample", "bf16+compile"),
    }  # fmt: skip
    for (section, mode), r in rows.items():
        assert r["status"] == "ok", (section, mode, r["status"])
        assert r["img_s"] > 0 and r["pct_ceiling"] > 0 and r["peak_gib"] > 0
        assert r["tflops"] == pytest.approx(
            r["img_s"] * fl["train_step" if section == "train" else "sample"] / 1e12
        )
    # the float32 path against its recomputing reference: the same arithmetic
    assert rows["train", "fp32-eager"]["check"]["grad_rel_err"] < gpu_dit.TOL_FP32
    for mode in ("bf16", "bf16+compile", "bf16+compile+ckpt1"):
        c = rows["train", mode]["check"]
        assert c["ok"] and c["loss_rel_err"] < 1e-2
        # bf16 really ran (it differs from float32) and stays within the 1e-2 tolerance
        assert 1e-5 < c["grad_rel_err"] < 1e-2
    for mode in ("bf16", "bf16+compile"):
        c = rows["sample", mode]["check"]
        assert c["ok"] and 0 < c["rel_err"] < gpu_dit.TOL_SAMPLE_BF16 and c["rows"] == 2
    assert "check" not in rows["sample", "fp32-eager"]  # it is the reference


@pytest.mark.parametrize(("size", "cond_dim"), [("T/8", None), ("T/4", 96)])
def test_flop_formula_matches_torch_flop_counter(size, cond_dim):
    """Analytic forward FLOPs minus attention == what FlopCounterMode counts for the matrix
    products and the patch convolution of a real forward (CPU SDPA is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {"family": "dit", "size": size, "depth": 2, "cond_dim": cond_dim}
    model = build_model(cfg, in_channels=3, image_size=16, num_classes=5).eval()
    flops = gpu_dit.dit_forward_flops(model.config, image_size=16, in_channels=3)
    b = 3
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(b, 3, 16, 16), torch.randint(0, 1000, (b,)), torch.randint(0, 5, (b,)))
    assert counter.get_total_flops() == b * (flops["forward"] - flops["attention"])


def test_flop_formula_gives_the_anchor_712_gflop_for_xl2():
    cfg = resolve_model_config({"family": "dit", "size": "XL/2"})
    flops = gpu_dit.dit_forward_flops(cfg, image_size=32, in_channels=4)
    assert flops["tokens"] == 256
    assert flops["train_step"] / 1e9 == pytest.approx(712, abs=0.5)  # 3 x the 237.3 GFLOP forward (README)


def test_out_of_memory_becomes_a_table_entry():
    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def wrapped() -> dict:
        try:
            oom()
        except torch.OutOfMemoryError as e:
            raise RuntimeError("backend compiler failed") from e

    def broken() -> dict:
        raise ValueError("shape mismatch")

    dev = torch.device("cpu")
    assert gpu_dit.guarded(oom, dev) == {"status": "out of memory"}
    assert gpu_dit.guarded(wrapped, dev) == {"status": "out of memory"}
    assert gpu_dit.guarded(broken, dev)["status"] == "error: ValueError: shape mismatch"
    row = {"section": "train", "mode": "bf16", "batch": 256, "status": "out of memory"}
    assert "| out of m" in gpu_dit.table([row]) and row["status"] in gpu_dit.table([row])


def test_training_check_sees_a_different_perturbation_draw():
    """Same seed: identical loss and gradients. Another CFG-dropout / CEP-U draw (what a fast
    path that perturbs differently would produce) fails the 1e-2 gradient check."""
    torch.manual_seed(0)
    cfg = {
        "family": "dit",
        "size": "T/8",
        "depth": 2,
        "perturbation": {"name": "cep-u", "gamma": 1},
    }
    model = build_model(cfg, in_channels=4, image_size=16, num_classes=10).train()
    gpu_dit.randomize_zero_init(model, 0)
    assert all(p.any() for p in model.parameters())
    params = list(model.parameters())
    sched = NoiseSchedule()
    inputs = gpu_dit.check_inputs(16, (4, 16, 16), 10, 0, torch.device("cpu"))
    mode = gpu_dit.Mode("fp32", None)
    l1, g1 = gpu_dit.loss_and_grads(model, sched, params, inputs, mode, seed=3)
    l2, g2 = gpu_dit.loss_and_grads(model, sched, params, inputs, mode, seed=3)
    l3, g3 = gpu_dit.loss_and_grads(model, sched, params, inputs, mode, seed=4)
    assert gpu_dit.grad_rel_err(g2, g1) == 0 and float(l1) == float(l2)
    assert gpu_dit.grad_rel_err(g3, g1) > gpu_dit.TOL_BF16


def test_bad_arguments_raise_user_errors():
    parse = gpu_dit.build_parser().parse_args
    with pytest.raises(UserError, match="--modes: unknown training mode 'fp8'"):
        gpu_dit.parse_train_modes(["fp8"], [1])
    with pytest.raises(UserError, match="--sample-modes"):
        gpu_dit.parse_sample_modes(["fast"], torch.device("cpu"))
    with pytest.raises(UserError, match="--steps must be >= 1"):
        gpu_dit.resolve_args(parse(["--device", "cpu", "--steps", "0"]))
    with pytest.raises(UserError, match="--device 'gpu0'"):
        gpu_dit.resolve_args(parse(["--device", "gpu0"]))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            gpu_dit.resolve_args(parse(["--device", "cuda"]))
    # CUDA graphs are CUDA-only: skipped from the CPU mode list, never an error
    assert [m.name for m in gpu_dit.parse_sample_modes(list(gpu_dit.SAMPLE_MODES), torch.device("cpu"))] == [
        "bf16", "bf16+compile",
    ]  # fmt: skip


def test_timing_helpers_on_cpu():
    calls: list[int] = []
    times = tm.time_repeats(calls.append, torch.device("cpu"), warmup=2, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
    ceil = tm.matmul_ceiling(torch.device("cpu"), n=128, dtype=torch.float32, repeats=3)
    assert ceil["flops"] > 1e6 and ceil["tflops_best"] >= ceil["tflops_median"]
