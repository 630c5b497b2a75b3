"""Figures of the Gaussian-mixture lab (matplotlib, Agg backend, PNG, atomic writes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from condnoise.io import write_bytes
from condnoise.plotting import png_bytes, pyplot
from condnoise.stats import t_interval
from condnoise.theory import gmm
from condnoise.theory import simulate as sim

if TYPE_CHECKING:
    from condnoise.theory.lab import GMMLabConfig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    write_bytes(path, png_bytes(fig, dpi=130))
    return path


def plot_entropy_gap(rows: list[dict[str, Any]], cfg: GMMLabConfig, path: Path) -> Path:
    """Theorem 1: entropy gap vs g^2 d at the largest n, one series per d (mean +- 95% CI
    over replicates is shown as error bars; the finite-T closed form as a line)."""
    plt = pyplot()
    n = max(cfg.n)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(cfg.d)))
    xmax = 0.0
    for color, d in zip(colors, sorted(cfg.d)):
        sel = sorted((r for r in rows if r["d"] == d and r["n"] == n), key=lambda r: r["gamma"])
        g = np.array([r["gamma"] for r in sel])
        if not sel or any(np.isnan(r["entropy_gap_sim"]) for r in sel):
            continue  # n_k <= d: singular S, entropies undefined
        mean, half = t_interval(np.array([r["entropy_gap_sim_replicates"] for r in sel]).T)
        x = g ** 2 * d
        xmax = max(xmax, float(x.max()))
        half = np.where(np.isnan(half), 0.0, half)  # one replicate: no interval, no bar
        ax.errorbar(x, mean, yerr=half, fmt="o", color=color, ms=5, capsize=3,
                    label=f"simulated, d={d}")
        ax.plot(x, [r["entropy_gap_pred"] for r in sel], "-", color=color, lw=1.2,
                label=f"closed form, d={d}")
    xs = np.linspace(0, xmax, 50)
    ax.plot(xs, 0.5 * cfg.mean_scale ** 2 * xs, "k--", lw=1,
            label=r"$\frac{1}{2}\rho^2 g^2 d$ (small-$g$ slope)")
    ax.set_xlabel(r"$g^2 d$")
    ax.set_ylabel(r"$H(\mathrm{corrupted}) - H(\mathrm{clean})$  [nats]")
    ax.set_title(f"Theorem 1: entropy gap grows like $g^2 d$  (n={n}, "
                 rf"$\|\mu\|=\rho\sqrt{{d}}$, $\rho$={cfg.mean_scale:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, ncol=2)
    return _save(fig, path)


def plot_w2_sweep(sweep: dict[str, Any], path: Path) -> Path:
    """Theorem 2: change of W2^2 to the truth vs g (U-shaped, minimum marked) and g* vs n."""
    plt = pyplot()
    d = sweep["d"]
    g = np.array(sweep["gamma"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.cm.plasma(np.linspace(0.1, 0.8, len(sweep["per_n"])))
    for color, p in zip(colors, sweep["per_n"]):
        n = p["n"]
        scale = n / d
        mean = np.array(p["delta_mean"]) * scale
        half = np.array(p["deltaci95"]) * scale
        ax.plot(g, mean, "-", color=color, lw=1.8, label=f"n={n}: simulated (mean, 95% CI)")
        ax.fill_between(g, mean - half, mean + half, color=color, alpha=0.25)
        ax.plot(g, np.array(p["delta_pred"]) * scale, ":", color=color, lw=1.5,
                label=f"n={n}: closed form")
        j = int(np.argmin(mean))
        ax.plot(g[j], mean[j], "v", color=color, ms=10, mec="k")
        ax.annotate(f"g*={g[j]:.2f}", (g[j], mean[j]), textcoords="offset points",
                    xytext=(4, -14), fontsize=8, color=color)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("corruption strength g")
    ax.set_ylabel(r"$[W_2^2(P,\hat P_g) - W_2^2(P,\hat P_0)]\;\cdot\; n/d$")
    ax.set_title(f"Theorem 2: W2$^2$ to the truth vs g (d={d}); minimum marked")
    lo = min(min(np.array(p["delta_mean"]) * p["n"] / d) for p in sweep["per_n"])
    ax.set_ylim(1.6 * lo, -1.6 * lo)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)

    ns = np.array([p["n"] for p in sweep["per_n"]], dtype=np.float64)
    gs = np.array([p["g_star_sim"] for p in sweep["per_n"]])
    ge = np.array([p["g_star_expected"] for p in sweep["per_n"]])
    bx.loglog(ns, gs, "o", ms=8, color="C3", label="simulated g* (grid argmin)")
    bx.loglog(ns, ge, "s", ms=6, mfc="none", color="C0", label="g* of leading-order E[gain]")
    ref = ge[0] * np.sqrt(ns[0] / ns)
    bx.loglog(ns, ref, "k--", lw=1, label=r"$\propto 1/\sqrt{n}$")
    slope = sweep.get("g_star_sim_loglog_slope")
    bx.set_title(f"W2-optimal g vs n (fitted slope {slope:.2f}, reference -0.5)"
                 if slope is not None else "W2-optimal g vs n")
    bx.set_xlabel("n (samples per class)")
    bx.set_ylabel("g*")
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_densities_2d(cfg: GMMLabConfig, path: Path) -> Path:
    """Generated vs true densities in 2-D for clean (g = 0) and corrupted (g = plot_gamma)."""
    from scipy.stats import gaussian_kde

    plt = pyplot()
    K = max(3, cfg.num_classes)
    rng = np.random.default_rng([cfg.seed, 2])
    angles = 2 * np.pi * np.arange(K) / K + 0.3
    means = cfg.plot_mean_norm * np.c_[np.cos(angles), np.sin(angles)]
    xs = sim.sample_mixture(rng, means, [cfg.plot_n] * K)
    t = sim.time_grid(cfg.T, cfg.steps)
    z_T = rng.standard_normal((1500, 2))
    lim = cfg.plot_mean_norm + 3.5
    grid = np.linspace(-lim, lim, 160)
    X, Y = np.meshgrid(grid, grid)
    pts = np.c_[X.ravel(), Y.ravel()]
    true = sum(np.exp(-0.5 * np.sum((pts - mu) ** 2, 1)) for mu in means) / (2 * np.pi * K)
    true = true.reshape(X.shape)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 5.0), sharey=True)
    for ax, g in zip(axes, (0.0, cfg.plot_gamma)):
        gen = np.vstack([sim.generate(sim.fit_least_squares(x, k, K, t, g), k, z_T,
                                      cfg.integrator) for k, x in enumerate(xs)])
        dens = gaussian_kde(gen.T)(pts.T).reshape(X.shape)
        ax.contourf(X, Y, dens, levels=12, cmap="Blues")
        ax.contour(X, Y, true, levels=5, colors="crimson", linewidths=1.0)
        for k, x in enumerate(xs):
            ax.scatter(x[:, 0], x[:, 1], s=16, c="k", marker="x", lw=1,
                       label="training samples" if k == 0 else None)
            mg, Cg = gmm.generated_limit(*gmm.empirical_moments(x), g)
            ax.plot(*mg, "o", mfc="gold", mec="k", ms=7,
                    label="generated class mean" if k == 0 else None)
        H = float(np.mean([gmm.gaussian_entropy(gmm.generated_limit(
            *gmm.empirical_moments(x), g)[1]) for x in xs]))
        w2 = float(np.mean([gmm.w2_to_truth(mu, *gmm.empirical_moments(x), g, cfg.T)
                            for mu, x in zip(means, xs)]))
        ax.set_title(f"{'clean' if g == 0 else 'corrupted'} (g={g:g}): "
                     f"mean H={H:.2f}, mean W2$^2$={w2:.2f}")
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    axes[0].plot([], [], color="crimson", label="true density (contours)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Generated density (blue, KDE of ODE samples) vs truth, {K} classes, "
                 f"n={cfg.plot_n} per class", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
