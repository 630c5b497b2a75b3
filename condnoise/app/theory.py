"""``condnoise theory gmm``: the Gaussian-mixture lab of paper section 7."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from condnoise.app.common import (
    add_parser,
    add_progress_option,
    float_range,
    int_range,
    positive_int,
    seed_int,
    show_progress,
    typed_list,
)
from condnoise.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    theory = add_parser(
        subparsers, "theory", help="Gaussian-mixture theory lab (paper section 7)",
        description="Closed forms vs simulation for the paper's Gaussian-mixture theory.")
    tsub = theory.add_subparsers(dest="theory_command", metavar="LAB", required=True)
    p = add_parser(
        tsub, "gmm",
        help="simulate the GMM theory (Lemmas 3-4, Theorems 1-2), table + figures",
        description=(
            "Fit the class-wise linear denoiser (least squares and SGD), run the reverse ODE,\n"
            "compare generated mean / covariance / entropy gap / W2^2 gap with the closed\n"
            "forms, sweep g for the W2-optimal corruption, write table, figures, provenance.\n"
            "example: condnoise theory gmm --d 8,32,128 --n 50,200,1000 "
            "--gamma 0,0.02,0.05,0.1,0.2 --out runs/theory"))
    p.add_argument("--d", type=typed_list(int, "d", positive_int), default=[8, 32, 128],
                   help="data dimensions (comma-separated)")
    p.add_argument("--n", type=typed_list(int, "n", int_range(2)), default=[50, 200, 1000],
                   help="training samples per class (comma-separated)")
    p.add_argument("--gamma", type=typed_list(float, "gamma", float_range(0)),
                   default=[0.0, 0.02, 0.05, 0.1, 0.2],
                   help="corruption strengths g of the condition c + g*xi for the table")
    p.add_argument("--seed", type=seed_int, default=0, help="base random seed")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="training sets (replicates) per table cell")
    p.add_argument("--classes", type=positive_int, default=2, help="number of mixture classes K")
    p.add_argument("--weights", type=typed_list(float, "weights", float_range(0, lo_open=True)),
                   default=None, help="class weights (K values; n_k = round(n K w_k)); None: equal")
    p.add_argument("--mean-scale", type=float_range(0, lo_open=True), default=0.5,
                   help="class-mean norm per sqrt(d): ||mu_k|| = mean_scale * sqrt(d)")
    p.add_argument("--T", type=float_range(0, lo_open=True), default=5.0,
                   help="ODE start time T (finite-T closed forms)")
    p.add_argument("--steps", type=int_range(2), default=128,
                   help="ODE steps (grid uniform in log-SNR; Euler needs many more, see README)")
    p.add_argument("--integrator", choices=("heun", "euler"), default="heun",
                   help="ODE integrator (heun: 2nd order; euler: 1st order)")
    p.add_argument("--sample-budget", type=positive_int, default=200_000,
                   help="generated points per class and g = max(1000, budget // d)")
    p.add_argument("--sweep-d", type=positive_int, default=None,
                   help="dimension of the W2-vs-g sweep (None: the middle value of --d)")
    p.add_argument("--sweep-gamma-max", type=float_range(0, lo_open=True), default=0.6,
                   help="largest g of the sweep")
    p.add_argument("--sweep-points", type=int_range(5), default=31, help="g values in the sweep")
    p.add_argument("--sweep-seeds", type=int_range(2), default=8,
                   help="training sets in the sweep")
    p.add_argument("--sgd-iters", type=positive_int, default=800,
                   help="SGD iterations of the SGD check")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--out", type=Path, default=Path("runs/theory-gmm"), help="output folder")
    add_progress_option(p)
    p.set_defaults(func=run_gmm_command)


def run_gmm_command(args: argparse.Namespace) -> int:
    from condnoise.locks import folder_lock
    from condnoise.theory.lab import GMMLabConfig, run_gmm_lab

    cfg = GMMLabConfig(
        d=args.d, n=args.n, gamma=args.gamma, seed=args.seed, seeds=args.seeds,
        num_classes=args.classes, weights=args.weights, mean_scale=args.mean_scale, T=args.T,
        steps=args.steps, integrator=args.integrator, sample_budget=args.sample_budget,
        sweep_d=args.sweep_d, sweep_gamma_max=args.sweep_gamma_max,
        sweep_points=args.sweep_points, sweep_seeds=args.sweep_seeds,
        sgd_iters=args.sgd_iters, figures=not args.no_figures).validate()
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    start = time.perf_counter()
    with folder_lock(args.out, "theory gmm"):
        res = run_gmm_lab(cfg, args.out, progress=show_progress(args))
    print(report_text(res, cfg))
    print(f"\nwrote {args.out}/ (table.csv, table.json, results.json, provenance.json"
          f"{', figures/' if res.figures else ''}) in {time.perf_counter() - start:.1f} s")
    return 0


def report_text(res, cfg) -> str:
    """The table, the tolerance verdict, the W2-optimal g per n and the SGD check."""
    from condnoise.theory.lab import format_table

    ok = res.all_within_tolerance
    lines = [format_table(res.rows), "",
             "simulated vs finite-T closed form; tolerances: mean 2%, cov trace 2%, entropy gap "
             f"5%, W2^2 gap 5% (of max(|gap|, 1% of W2^2)): {'all within' if ok else 'SOME OUTSIDE'}"]
    if not ok and cfg.integrator == "euler":
        lines.append("  (Euler is first order: its W2^2-gap error falls only as 1/steps; use "
                     "--integrator heun, or see README for the steps Euler needs)")
    sw = res.sweep
    lines += ["", f"W2-optimal g (d={sw['d']}):"]
    for p in sw["per_n"]:
        lines.append(
            f"  n={p['n']:>5}: g* simulated {p['g_star_sim']:.3f}, closed form "
            f"{p['g_star_pred']:.3f}, leading-order {p['g_star_expected']:.3f}; W2^2 gain "
            f"{p['gain_at_g_star']:.4g} (g^2 d/n = {p['theorem2_rate_at_g_star']:.4g})")
    slopes = [(w, sw[f"g_star_{k}_loglog_slope"]) for w, k in (("simulated", "sim"),
                                                                ("leading-order", "expected"))]
    shown = [f"{w} {v:.2f}" for w, v in slopes if v is not None]
    if shown:
        lines.append(f"  log g* vs log n slope: {', '.join(shown)} (1/sqrt(n) gives -0.5)")
    else:
        lines.append("  log g* vs log n slope: needs two or more --n values with g* > 0")
    s = res.sgd
    lines += ["", f"SGD vs least squares (d={s['d']}, n={s['n']}, g={s['gamma']}, {s['iters']} "
              "iters): relative parameter error " + ", ".join(
                  f"t={t:g}: {100 * e:.2f}%" for t, e in zip(s["t"], s["relative_param_error"]))]
    return "\n".join(lines)
