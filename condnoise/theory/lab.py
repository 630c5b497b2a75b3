"""The Gaussian-mixture lab (paper section 7): simulate, compare with the closed forms,
sweep the corruption strength g, write table + figures + provenance.

Entry point for the CLI and the study report: :func:`run_gmm_lab`.
"""

from __future__ import annotations

import csv
import io as _io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condnoise.errors import UserError
from condnoise.io import write_json, write_text
from condnoise.provenance import write_provenance
from condnoise.stats import gaussian_w2_squared, t_interval
from condnoise.theory import gmm
from condnoise.theory import simulate as sim

# Relative tolerances the table is checked against (simulated vs finite-T closed form).
TOLERANCES = {"mean": 0.02, "cov_trace": 0.02, "entropy_gap": 0.05, "w2_gap": 0.05}
# The W2^2 gap is a small difference of two W2^2 values (it changes sign near the optimal
# g); its error is taken relative to max(|gap|, W2_GAP_FLOOR * W2^2(P, clean)): 5% of the gap
# or 0.05% of W2^2 itself, whichever is larger (ODE discretisation error is O(h^2) in both).
W2_GAP_FLOOR = 1e-2


@dataclass
class GMMLabConfig:
    """Everything the lab needs; validated by :meth:`validate` (raises UserError)."""

    d: list[int] = field(default_factory=lambda: [8, 32, 128])
    n: list[int] = field(default_factory=lambda: [50, 200, 1000])
    gamma: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.2])
    seed: int = 0
    seeds: int = 3
    num_classes: int = 2
    mean_scale: float = 0.5  # ||mu_k|| = mean_scale * sqrt(d): O(1) coordinates
    weights: list[float] | None = None
    T: float = 5.0
    steps: int = 128
    integrator: str = "heun"
    sample_budget: int = 200_000  # generated points per (class, g) = max(1000, budget // d)
    sweep_d: int | None = None  # None: the middle value of d
    sweep_gamma_max: float = 0.6
    sweep_points: int = 31
    sweep_seeds: int = 8
    sgd_iters: int = 800
    sgd_batch: int = 1024
    sgd_lr: float = 0.1
    sgd_times: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    plot_n: int = 8
    plot_gamma: float = 0.3
    plot_mean_norm: float = 4.0
    figures: bool = True

    def validate(self) -> GMMLabConfig:
        def pos_ints(name: str, vals: list[int], lo: int) -> None:
            if not vals or any(int(v) != v or v < lo for v in vals):
                raise UserError(f"--{name}: need integers >= {lo}, got {vals}")

        pos_ints("d", self.d, 1)
        pos_ints("n", self.n, 2)
        if not self.gamma or any(not math.isfinite(g) or g < 0 for g in self.gamma):
            raise UserError(f"--gamma: need finite values >= 0, got {self.gamma}")
        if self.seeds < 1 or self.sweep_seeds < 2:
            raise UserError("--seeds must be >= 1 and --sweep-seeds >= 2")
        if self.num_classes < 1:
            raise UserError(f"--classes must be >= 1, got {self.num_classes}")
        if self.weights is not None and (
            len(self.weights) != self.num_classes or any(w <= 0 for w in self.weights)
        ):
            raise UserError(
                f"--weights: need {self.num_classes} positive values, got {self.weights}")
        if not (self.T > 0 and math.isfinite(self.T)):
            raise UserError(f"--T must be a positive number, got {self.T}")
        if self.steps < 2:
            raise UserError(f"--steps must be >= 2, got {self.steps}")
        if self.integrator not in sim.INTEGRATORS:
            raise UserError(f"--integrator must be one of {sim.INTEGRATORS}, got {self.integrator}")
        if self.mean_scale <= 0 or self.sweep_gamma_max <= 0 or self.sweep_points < 5:
            raise UserError("--mean-scale and --sweep-gamma-max must be > 0, --sweep-points >= 5")
        if self.sweep_d is not None and self.sweep_d < 1:
            raise UserError(f"--sweep-d must be >= 1, got {self.sweep_d}")
        for name in ("seed", "sample_budget", "sgd_iters", "sgd_batch"):
            lo = 0 if name == "seed" else 1
            if int(getattr(self, name)) < lo:
                raise UserError(f"--{name.replace('_', '-')} must be >= {lo}, "
                                f"got {getattr(self, name)}")  # fmt: skip
        return self

    @property
    def resolved_sweep_d(self) -> int:
        return int(self.sweep_d) if self.sweep_d else sorted(self.d)[len(self.d) // 2]


@dataclass
class LabResult:
    """What :func:`run_gmm_lab` returns: table rows, sweep, SGD check, figure paths."""

    rows: list[dict[str, Any]]
    sweep: dict[str, Any]
    sgd: dict[str, Any]
    figures: list[Path]
    files: dict[str, Path]
    all_within_tolerance: bool


def json_safe(obj: Any) -> Any:
    """NaN (undefined, e.g. entropies when n_k <= d) -> None, so the JSON files are standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _relerr(sim_v: float, pred_v: float, floor: float = 0.0) -> float:
    """|sim - pred| / max(|pred|, floor); NaN where undefined (0 / 0 or NaN inputs)."""
    den = max(abs(pred_v), floor)
    if den == 0 or math.isnan(sim_v) or math.isnan(pred_v):
        return float("nan")
    return abs(sim_v - pred_v) / den


def _dataset(cfg: GMMLabConfig, d: int, n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng([cfg.seed, seed, d, n])
    weights = None if cfg.weights is None else np.asarray(cfg.weights)
    means = sim.class_means(rng, cfg.num_classes, d, cfg.mean_scale * math.sqrt(d))
    return means, sim.sample_mixture(rng, means, sim.class_sizes(n, weights, cfg.num_classes))


def _table_cell(cfg: GMMLabConfig, d: int, n: int, t: np.ndarray) -> list[dict[str, Any]]:
    """All replicates (seeds x classes) of one (d, n) for every g, aggregated per g."""
    num = max(1000, cfg.sample_budget // d)
    per_g: dict[float, list[dict[str, float]]] = {g: [] for g in cfg.gamma}
    for s in range(cfg.seeds):
        means, xs = _dataset(cfg, d, n, s)
        z_T = sim.antithetic_normal(np.random.default_rng([cfg.seed, s, d, n, 1]), num, d)
        for k, (mu, x) in enumerate(zip(means, xs)):
            for g, rep in _replicate(cfg, mu, x, k, z_T, t).items():
                per_g[g].append(rep)
    return [_table_row(d, n, g, num, per_g[g]) for g in cfg.gamma]


def _replicate(cfg: GMMLabConfig, mu: np.ndarray, x: np.ndarray, k: int, z_T: np.ndarray,
               t: np.ndarray) -> dict[float, dict[str, float]]:  # fmt: skip
    """One training set of class ``k``: simulated vs closed-form values for every g; the
    gaps are relative to the smallest g of the list (0 in the default grid)."""
    d = x.shape[1]
    m, S = gmm.empirical_moments(x)
    full_rank = len(x) > d  # else S is singular and entropies are -inf
    nan = float("nan")
    base: dict[str, float] = {}
    out = {}
    for g in sorted(cfg.gamma):
        den = sim.fit_least_squares(x, k, cfg.num_classes, t, g)
        c_ode, M = sim.ode_affine_map(den, k, cfg.integrator)
        # the discretised ODE is affine, so pushing z_T through (c, M) is the same as
        # integrating every sample (checked in tests/test_theory.py), only faster
        st = sim.sample_stats(z_T @ M.T + c_ode, mu, entropy=full_rank)
        w2_ode = gaussian_w2_squared(mu, np.eye(d), c_ode, M @ M.T)
        pm, pC = gmm.generated_finite_t(m, S, g, cfg.T, t_end=t[-1])
        w2_pred = gmm.w2_to_truth(mu, m, S, g, cfg.T, t_end=t[-1])
        H_pred = gmm.gaussian_entropy(pC) if full_rank else nan
        if not base:
            base = {"H": st.entropy, "H_pred": H_pred, "w2": w2_ode, "w2_pred": w2_pred}
        _, pC_paper = gmm.generated_limit(m, S, g, "paper")
        out[g] = {
            "mean_sim": float(np.linalg.norm(st.mean)),
            "mean_pred": float(np.linalg.norm(pm)),
            "mean_err": float(np.linalg.norm(st.mean - pm) / np.linalg.norm(pm)),
            "tr_sim": float(np.trace(st.cov)), "tr_pred": float(np.trace(pC)),
            "tr_pred_inf": float(np.trace(gmm.generated_limit(m, S, g)[1])),
            "tr_paper": float(np.trace(pC_paper)),
            "dH_sim": st.entropy - base["H"],
            "dH_pred": H_pred - base["H_pred"],
            "dH_thm1": gmm.entropy_gap(m, S, g, "exact") if full_rank else nan,
            "dH_paper": gmm.entropy_gap(m, S, g, "paper") if full_rank else nan,
            "w2_sim": st.w2, "w2_pred": w2_pred,
            "dW2_sim": base["w2"] - w2_ode, "dW2_pred": base["w2_pred"] - w2_pred,
            "dW2_scale": base["w2_pred"],
            "dW2_expected": float(gmm.expected_w2_gain(float(mu @ mu), d, len(x), g)),
        }  # fmt: skip
    return out


def _table_row(d: int, n: int, g: float, num: int, reps: list[dict[str, float]]) -> dict[str, Any]:
    """Means over the replicates and the worst relative error of each checked quantity."""

    def avg(key: str) -> float:
        return float(np.mean([r[key] for r in reps]))

    def worst(sk: str, pk: str, floor: str | None = None) -> float:
        errs = [_relerr(r[sk], r[pk], r[floor] * W2_GAP_FLOOR if floor else 0.0) for r in reps]
        return float("nan") if any(math.isnan(e) for e in errs) else float(max(errs))

    row = {
        "d": d, "n": n, "gamma": g, "replicates": len(reps), "gen_samples": num,
        "mean_norm_sim": avg("mean_sim"), "mean_norm_pred": avg("mean_pred"),
        "mean_relerr": float(max(r["mean_err"] for r in reps)),
        "cov_trace_sim": avg("tr_sim"), "cov_trace_pred": avg("tr_pred"),
        "cov_trace_relerr": worst("tr_sim", "tr_pred"),
        "cov_trace_pred_Tinf": avg("tr_pred_inf"), "cov_trace_paper_lemma4": avg("tr_paper"),
        "entropy_gap_sim": avg("dH_sim"), "entropy_gap_pred": avg("dH_pred"),
        "entropy_gap_relerr": worst("dH_sim", "dH_pred"),
        "entropy_gap_sim_replicates": [r["dH_sim"] for r in reps],
        "entropy_gap_thm1_Tinf": avg("dH_thm1"), "entropy_gap_paper_thm1": avg("dH_paper"),
        "w2_sim": avg("w2_sim"), "w2_pred": avg("w2_pred"),
        "w2_gap_sim": avg("dW2_sim"), "w2_gap_pred": avg("dW2_pred"),
        "w2_gap_relerr": worst("dW2_sim", "dW2_pred", floor="dW2_scale"),
        "w2_gap_expected": avg("dW2_expected"),
    }  # fmt: skip
    row["within_tolerance"] = bool(all(
        math.isnan(row[f"{key}_relerr"]) or row[f"{key}_relerr"] <= tol
        for key, tol in TOLERANCES.items()))
    return row


def _sweep(cfg: GMMLabConfig, t: np.ndarray, progress: bool) -> dict[str, Any]:
    """W2^2 to the truth vs g for each n (d = sweep_d), via the ODE map, over seeds."""
    from tqdm import tqdm

    d = cfg.resolved_sweep_d
    grid = np.linspace(0.0, cfg.sweep_gamma_max, cfg.sweep_points)
    mu_norm2 = (cfg.mean_scale ** 2) * d
    out: dict[str, Any] = {"d": d, "gamma": grid.tolist(), "per_n": []}
    for n in tqdm(sorted(cfg.n), desc=f"sweep g (d={d})", disable=not progress, leave=False):
        w2_sim = np.zeros((cfg.sweep_seeds, len(grid)))
        w2_pred = np.zeros_like(w2_sim)
        for s in range(cfg.sweep_seeds):
            means, xs = _dataset(cfg, d, n, 1000 + s)
            mu, x = means[0], xs[0]
            m, S = gmm.empirical_moments(x)
            for j, g in enumerate(grid):
                den = sim.fit_least_squares(x, 0, cfg.num_classes, t, float(g))
                c, C = sim.ode_map(den, 0, cfg.integrator)
                w2_sim[s, j] = gaussian_w2_squared(mu, np.eye(d), c, C)
                w2_pred[s, j] = gmm.w2_to_truth(mu, m, S, float(g), cfg.T, t_end=t[-1])
        delta = w2_sim - w2_sim[:, :1]  # paired change vs clean, per training set
        mean_delta, half = t_interval(delta)
        j_star = int(np.argmin(mean_delta))
        n0 = len(xs[0])
        expected = gmm.expected_w2_gain(mu_norm2, d, n0, grid)
        out["per_n"].append({
            "n": n, "w2_sim": w2_sim.mean(0).tolist(), "w2_pred": w2_pred.mean(0).tolist(),
            "delta_mean": mean_delta.tolist(), "deltaci95": half.tolist(),
            "delta_pred": (w2_pred - w2_pred[:, :1]).mean(0).tolist(),
            "delta_expected": (-expected).tolist(),
            "g_star_sim": float(grid[j_star]),
            "g_star_pred": float(grid[int(np.argmin((w2_pred - w2_pred[:, :1]).mean(0)))]),
            "g_star_expected": gmm.optimal_gamma(mu_norm2, d, n0),
            "gain_at_g_star": float(-mean_delta[j_star]),
            "theorem2_rate_at_g_star": float(gmm.theorem2_rate(d, n0, grid[j_star])),
        })
    ns = np.array([p["n"] for p in out["per_n"]], dtype=np.float64)
    for key in ("g_star_sim", "g_star_expected"):
        gs = np.array([p[key] for p in out["per_n"]])
        ok = gs > 0
        slope = float(np.polyfit(np.log(ns[ok]), np.log(gs[ok]), 1)[0]) if ok.sum() >= 2 else None
        out[f"{key}_loglog_slope"] = slope
    out["reference_slope"] = -0.5
    return out


def _sgd_check(cfg: GMMLabConfig) -> dict[str, Any]:
    """SGD-trained piecewise linear denoiser vs the least-squares one (smallest d, n)."""
    d, n = min(cfg.d), min(cfg.n)
    g = max(cfg.gamma)
    means, xs = _dataset(cfg, d, n, 0)
    t = np.asarray(cfg.sgd_times, dtype=np.float64)
    ls = sim.fit_least_squares(xs[0], 0, cfg.num_classes, t, g)
    den, losses = sim.fit_sgd(xs[0], 0, cfg.num_classes, t, g, iters=cfg.sgd_iters,
                              batch=cfg.sgd_batch, lr=cfg.sgd_lr, seed=cfg.seed)
    err = np.linalg.norm(den.theta - ls.theta, axis=(1, 2)) / np.linalg.norm(ls.theta, axis=(1, 2))
    return {"d": d, "n": n, "gamma": g, "t": t.tolist(), "iters": cfg.sgd_iters,
            "relative_param_error": err.tolist(), "loss_first": losses[0],
            "loss_last100": float(np.mean(losses[-100:]))}


TABLE_COLUMNS = (
    "d", "n", "gamma", "replicates", "gen_samples",
    "mean_norm_sim", "mean_norm_pred", "mean_relerr",
    "cov_trace_sim", "cov_trace_pred", "cov_trace_relerr", "cov_trace_pred_Tinf",
    "cov_trace_paper_lemma4",
    "entropy_gap_sim", "entropy_gap_pred", "entropy_gap_relerr", "entropy_gap_thm1_Tinf",
    "entropy_gap_paper_thm1",
    "w2_sim", "w2_pred", "w2_gap_sim", "w2_gap_pred", "w2_gap_relerr", "w2_gap_expected",
    "within_tolerance",
)


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """Console table: simulated / predicted (finite-T closed form) and relative error."""

    def e(v: float) -> str:
        return "    -" if math.isnan(v) else f"{100 * v:4.1f}%"

    head = (f"{'d':>4} {'n':>5} {'g':>5} | {'|mean| sim/pred':>17} {'err':>5} | "
            f"{'tr cov sim/pred':>19} {'err':>5} | {'dH sim/pred':>17} {'err':>5} | "
            f"{'dW2 sim/pred':>19} {'err':>5} | ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['d']:>4} {r['n']:>5} {r['gamma']:>5.3g} | "
            f"{r['mean_norm_sim']:>8.4f}/{r['mean_norm_pred']:<8.4f} {e(r['mean_relerr'])} | "
            f"{r['cov_trace_sim']:>9.3f}/{r['cov_trace_pred']:<9.3f} {e(r['cov_trace_relerr'])} | "
            f"{r['entropy_gap_sim']:>8.4f}/{r['entropy_gap_pred']:<8.4f} "
            f"{e(r['entropy_gap_relerr'])} | "
            f"{r['w2_gap_sim']:>9.5f}/{r['w2_gap_pred']:<9.5f} {e(r['w2_gap_relerr'])} | "
            f"{'yes' if r['within_tolerance'] else 'NO'}")
    return "\n".join(lines)


def run_gmm_lab(cfg: GMMLabConfig, out_dir: str | Path, *, progress: bool = False) -> LabResult:
    """Run the whole lab and write into ``out_dir``: ``table.csv``, ``table.json``,
    ``results.json`` (table, sweep, SGD check, tolerances), ``provenance.json`` and
    ``figures/*.png`` (unless ``cfg.figures`` is False). Returns the results and paths."""
    cfg.validate()
    with sim.single_threaded_blas():
        return _run(cfg, Path(out_dir), progress)


def _run(cfg: GMMLabConfig, out: Path, progress: bool) -> LabResult:
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    t = sim.time_grid(cfg.T, cfg.steps)
    rows: list[dict[str, Any]] = []
    cells = [(d, n) for d in cfg.d for n in cfg.n]
    for d, n in tqdm(cells, desc="gmm table", disable=not progress, leave=False):
        rows.extend(_table_cell(cfg, d, n, t))
    sweep = _sweep(cfg, t, progress)
    sgd = _sgd_check(cfg)
    files = {"table_csv": out / "table.csv", "table_json": out / "table.json",
             "results_json": out / "results.json"}
    write_text(files["table_csv"], table_csv(rows))
    write_json(files["table_json"], json_safe(rows))
    ok = all(r["within_tolerance"] for r in rows)
    figures: list[Path] = []
    if cfg.figures:
        from condnoise.theory import figures as figs

        fig_dir = out / "figures"
        figures = [
            figs.plot_entropy_gap(rows, cfg, fig_dir / "entropy_gap_vs_g2d.png"),
            figs.plot_w2_sweep(sweep, fig_dir / "w2_vs_gamma.png"),
            figs.plot_densities_2d(cfg, fig_dir / "densities_2d.png"),
        ]
    write_json(files["results_json"], json_safe({
        "config": asdict(cfg), "tolerances": TOLERANCES, "all_within_tolerance": ok,
        "table": rows, "sweep": sweep, "sgd": sgd, "figures": [str(p) for p in figures]}))
    files["provenance"] = write_provenance(out, asdict(cfg), cfg.seed)
    return LabResult(rows=rows, sweep=sweep, sgd=sgd, figures=figures, files=files,
                     all_within_tolerance=ok)
