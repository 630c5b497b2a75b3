"""Speed and peak memory of the evaluation metrics vs the public implementations.

Each case runs in its own subprocess (clean peak RSS via getrusage). Features are
synthetic Inception-like vectors (ReLU of correlated Gaussians, float32, fixed seed):
run time depends on sizes, not on content.

    python benchmarks/metrics.py                        # full sizes (minutes)
    python benchmarks/metrics.py --n 2000 --top-n 3000  # quick check
    python benchmarks/metrics.py --cases pr,prdc --out bench.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = ("pr", "prdc", "exact", "top-pr")


def make_features(n: int, dim: int, seed: int) -> object:
    import numpy as np

    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).standard_normal((64, dim)).astype(np.float32) / 8
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 5000):
        m = min(5000, n - s)
        z = rng.standard_normal((m, 64)).astype(np.float32)
        out[s : s + m] = np.maximum(z @ basis + 0.05 * rng.standard_normal((m, dim)), 0)
    return out


def run_case(case: str, n: int, dim: int, top_n: int, threads: int) -> dict:
    """Runs inside the subprocess."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    info: dict = {"case": case}
    if case in ("pr", "prdc", "exact"):
        size = n if case != "exact" else min(n, 2500)
        real, fake = make_features(size, dim, 0), make_features(size, dim, 1) * 1.02
        info.update(n=size, dim=dim)
        start = time.perf_counter()
        if case == "pr":
            from condnoise.evaluation.metrics import precision_recall

            info["result"] = precision_recall(real, fake, 3)
        elif case == "prdc":
            import prdc

            info["result"] = {k: float(v) for k, v in prdc.compute_prdc(real, fake, 3).items()}
        else:  # exactness of the float32 chunked path vs a float64 full matrix
            from scipy.spatial.distance import cdist

            from condnoise.evaluation import neighbors

            r64, f64 = real.astype(np.float64), fake.astype(np.float64)
            rr = np.sort(cdist(r64, r64), 1)[:, 3]
            rf = np.sort(cdist(f64, f64), 1)[:, 3]
            d = cdist(r64, f64)
            got = neighbors.cross_counts(r64, f64, rr, rf)
            info["result"] = {
                "radii_max_rel_diff": float(np.max(np.abs(neighbors.kth_neighbour_radii(r64, 3) / rr - 1))),
                "counts_equal": bool(np.array_equal(got[0], (d < rr[:, None]).sum(0))),
                "recall_equal": bool(np.array_equal(got[1], (d < rf[None]).any(1))),
                "coverage_equal": bool(np.array_equal(got[2], d.min(1) < rr)),
            }
    elif case == "top-pr":
        from condnoise.evaluation.metrics import top_pr

        real, fake = make_features(top_n, dim, 0), make_features(top_n, dim, 1) * 1.02
        info.update(n=top_n, dim=dim)
        start = time.perf_counter()
        info["result"] = top_pr(real, fake)
    else:
        raise SystemExit(f"unknown case {case}")
    info["seconds"] = round(time.perf_counter() - start, 2)
    info["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--n", type=int, default=20_000, help="samples per set for P/R")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--top-n", type=int, default=50_000, help="samples per set for TopP&R")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(run_case(args._child, args.n, args.dim, args.top_n, args.threads)))
        return 0
    rows = []
    for case in args.cases.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            case,
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--top-n",
            str(args.top_n),
            "--threads",
            str(args.threads),
        ]
        env = {
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "OPENBLAS_NUM_THREADS": str(args.threads),
        }
        import os

        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=Path(__file__).resolve().parents[1],
        )
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            rows.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['case']:8s} n={r['n']:>6} d={r['dim']:>5}  {r['seconds']:>8.2f} s  "
            f"peak {r['peak_rss_gib']:6.2f} GiB  {json.dumps(r['result'])}",
            flush=True,
        )
    by = {r["case"]: r for r in rows if "seconds" in r}
    if "pr" in by and "prdc" in by:
        print(
            f"speed-up of precision/recall vs prdc: {by['prdc']['seconds'] / by['pr']['seconds']:.2f}x"
        )
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from condnoise.io import write_json
        from condnoise.provenance import environment

        write_json(
            args.out,
            {
                "rows": rows,
                "environment": environment(),
                "args": {k: v for k, v in vars(args).items() if k != "_child"},
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
