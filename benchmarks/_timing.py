"""Timing helpers shared by the benchmark scripts (device-aware, no host syncs while timing).

CUDA: one pair of CUDA events around every repeat, a single ``synchronize`` at the end, so the
timed region never waits on the host. CPU: ``perf_counter`` around every repeat. Both warm up
first (compilation, autotuning, allocator growth stay out of the numbers) and report the median.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

GIB = float(1 << 30)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(
    fn: Callable[[int], Any], device: torch.device, *, warmup: int, repeats: int
) -> list[float]:
    """Seconds per call of ``fn(i)`` for ``repeats`` calls after ``warmup`` untimed calls.

    ``i`` counts all calls (warm-up first) so ``fn`` can rotate through input buffers.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for i in range(warmup):
        fn(i)
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for r in range(repeats):
            starts[r].record()
            fn(warmup + r)
            ends[r].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    out = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + r)
        out.append(time.perf_counter() - t0)
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak bytes allocated by tensors since the last reset. CPU: the process's peak
    resident set size so far (Linux ``ru_maxrss``, never reset: an upper bound per mode)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def peak_memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error, also when a compiler wrapped it in its own exception."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def matmul_ceiling(
    device: torch.device, *, n: int, dtype: torch.dtype, warmup: int = 3, repeats: int = 10
) -> dict[str, Any]:
    """FLOP/s of an ``n x n @ n x n`` matrix product in ``dtype`` (random operands, several
    operand sets rotated so repeats do not run from cache): the run's arithmetic ceiling."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    sets = [
        (
            torch.randn(n, n, generator=gen).to(device=device, dtype=dtype),
            torch.randn(n, n, generator=gen).to(device=device, dtype=dtype),
        )
        for _ in range(2)
    ]
    out = torch.empty(n, n, device=device, dtype=dtype)

    def run(i: int) -> None:
        a, b = sets[i % len(sets)]
        torch.mm(a, b, out=out)

    times = time_repeats(run, device, warmup=warmup, repeats=repeats)
    if not torch.isfinite(out).all():
        raise RuntimeError("matmul ceiling: the product holds non-finite values")
    flop = 2.0 * n**3
    best, med = min(times), median(times)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "median_s": med,
        "tflops_median": flop / med / 1e12,
        "tflops_best": flop / best / 1e12,
        "flops": flop / med,  # the ceiling used for every "% of ceiling" figure
    }


def fmt_num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"
