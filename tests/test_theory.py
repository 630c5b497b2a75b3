"""Gaussian-mixture theory lab (paper section 7): closed forms vs simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condnoise.app.cli import main
from condnoise.stats import gaussian_w2_squared
from condnoise.theory import gmm
from condnoise.theory import simulate as sim

T = 5.0


def _class_data(d: int, n: int, seed: int, scale: float = 0.5):
    rng = np.random.default_rng(seed)
    means = sim.class_means(rng, 2, d, scale * np.sqrt(d))
    return means, sim.sample_mixture(rng, means, [n, n])


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    A = rng.standard_normal((d, d))
    return A @ A.T / d + 0.3 * np.eye(d)


@pytest.mark.parametrize("g", [0.0, 0.3])
def test_generated_samples_match_lemmas_3_and_4(g: float) -> None:
    """ODE samples from the least-squares denoiser have the finite-T closed-form moments."""
    d, n, num = 6, 300, 40_000
    means, xs = _class_data(d, n, seed=1)
    x = xs[1]
    t = sim.time_grid(T, 64)
    den = sim.fit_least_squares(x, 1, 2, t, g)
    z = sim.generate(den, 1, sim.antithetic_normal(np.random.default_rng(2), num, d), "heun")
    mean_sim, cov_sim = z.mean(0), np.cov(z, rowvar=False)
    m, S = gmm.empirical_moments(x)
    mean_pred, cov_pred = gmm.generated_finite_t(m, S, g, T)
    # Monte-Carlo std of the trace is sqrt(2 tr C^2 / num) / tr C ~ 0.25%: 2% is ~8 sigma.
    assert abs(np.trace(cov_sim) / np.trace(cov_pred) - 1) < 0.02
    assert np.abs(cov_sim - cov_pred).max() < 6 * np.sqrt(2 / num) * np.abs(cov_pred).max()
    assert np.linalg.norm(mean_sim - mean_pred) < 0.01 * np.linalg.norm(mean_pred)
    if g > 0:  # Lemma 4's shrinkage: the mean is m / (1 + g^2), not m
        assert np.linalg.norm(mean_sim - m) > 0.5 * (1 - gmm.shrink(g)) * np.linalg.norm(m)
    # Finite-T forms converge to the T -> inf Lemmas 3/4.
    a, C = gmm.generated_limit(m, S, g)
    mT, CT = gmm.generated_finite_t(m, S, g, 40.0)
    np.testing.assert_allclose(mT, a, atol=1e-12)
    np.testing.assert_allclose(CT, C, atol=1e-12)


def test_inflation_is_rank_one_along_the_mean_not_isotropic() -> None:
    """Documents the reading of Lemma 4: least squares inflates along m only (module doc)."""
    d, n, g = 8, 400, 0.4
    means, xs = _class_data(d, n, seed=3, scale=1.0)
    x = xs[0]
    m, S = gmm.empirical_moments(x)
    t = sim.time_grid(T, 64)
    c0, C0 = sim.ode_map(sim.fit_least_squares(x, 0, 2, t, 0.0), 0)
    cg, Cg = sim.ode_map(sim.fit_least_squares(x, 0, 2, t, g), 0)
    added = np.trace(Cg) - np.trace(C0)
    exact = gmm.beta(g) * (m @ m)  # trace of beta m m^T
    paper = gmm.beta(g) * (m @ m) * d  # trace of beta ||m||^2 I
    assert abs(added / exact - 1) < 0.03
    assert added < 0.5 * paper


def test_generate_is_the_affine_ode_map() -> None:
    d = 5
    means, xs = _class_data(d, 50, seed=4)
    den = sim.fit_least_squares(xs[0], 0, 2, sim.time_grid(T, 32), 0.2)
    z_T = np.random.default_rng(0).standard_normal((200, d))
    for method in sim.INTEGRATORS:
        c, M = sim.ode_affine_map(den, 0, method)
        np.testing.assert_allclose(sim.generate(den, 0, z_T, method), z_T @ M.T + c, atol=1e-9)


def test_euler_converges_to_heun_and_closed_form() -> None:
    d = 4
    means, xs = _class_data(d, 80, seed=5)
    m, S = gmm.empirical_moments(xs[0])
    mean, _ = gmm.generated_finite_t(m, S, 0.2, T)

    def err(steps: int, method: str) -> float:
        den = sim.fit_least_squares(xs[0], 0, 2, sim.time_grid(T, steps), 0.2)
        return float(np.linalg.norm(sim.ode_map(den, 0, method)[0] - mean) / np.linalg.norm(mean))

    euler = [err(50, "euler"), err(200, "euler")]
    heun = [err(50, "heun"), err(200, "heun")]
    assert 2.5 < euler[0] / euler[1] < 6  # first order: 4x steps -> error / 4
    assert heun[0] / heun[1] > 10  # second order: error / 16
    assert heun[0] < 0.2 * euler[0]


@pytest.mark.parametrize("form", gmm.FORMS)
def test_entropy_gap_identity_is_exact(form: str) -> None:
    """Theorem 1 equals the entropy difference of the closed-form generated Gaussians."""
    rng = np.random.default_rng(6)
    for d in (1, 3, 20):
        S = _random_spd(rng, d)
        m = rng.standard_normal(d) * 2
        for g in (0.0, 0.05, 0.7):
            gap = gmm.entropy_gap(m, S, g, form)
            H0 = gmm.gaussian_entropy(gmm.generated_limit(m, S, 0.0, form)[1])
            Hg = gmm.gaussian_entropy(gmm.generated_limit(m, S, g, form)[1])
            assert gap == pytest.approx(Hg - H0, abs=1e-10)
            if g > 0:
                assert gap > 0


def test_w2_gaussian_matches_independent_computations() -> None:
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(7)
    d = 6
    C1, C2 = _random_spd(rng, d), _random_spd(rng, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    r1 = np.real(sqrtm(C1))
    ref = np.sum((m1 - m2) ** 2) + np.trace(C1 + C2 - 2 * np.real(sqrtm(r1 @ C2 @ r1)))
    assert gaussian_w2_squared(m1, C1, m2, C2) == pytest.approx(ref, rel=1e-9)
    # Commuting (diagonal) case: sum of squared differences of standard deviations.
    l1, l2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    assert gaussian_w2_squared(m1, np.diag(l1), m2, np.diag(l2)) == pytest.approx(
        np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2), rel=1e-12)
    # 1-D: empirical W2^2 of equal-size samples is the mean squared gap of sorted values.
    a = np.sort(rng.normal(0.3, 1.5, 400_000))
    b = np.sort(rng.normal(-0.4, 0.6, 400_000))
    emp = np.mean((a - b) ** 2)
    closed = gaussian_w2_squared([0.3], [[1.5**2]], [-0.4], [[0.6**2]])
    assert closed == pytest.approx(0.7**2 + 0.9**2, rel=1e-12)
    assert emp == pytest.approx(closed, rel=0.01)


def test_sgd_training_approaches_least_squares() -> None:
    d, g = 4, 0.2
    means, xs = _class_data(d, 100, seed=8)
    t = np.array([2.0, 1.0, 0.5, 0.2])
    ls = sim.fit_least_squares(xs[0], 0, 2, t, g)
    den, losses = sim.fit_sgd(xs[0], 0, 2, t, g, iters=600, batch=1024, lr=0.1, seed=0)
    err = np.linalg.norm(den.theta - ls.theta, axis=(1, 2)) / np.linalg.norm(ls.theta, axis=(1, 2))
    assert err.max() < 0.04, err
    assert np.mean(losses[-50:]) < 0.8 * losses[0]


def test_w2_optimal_gamma_shrinks_as_n_grows() -> None:
    d = 16
    mu2 = 0.25 * d
    g_exp = [gmm.optimal_gamma(mu2, d, n) for n in (50, 200, 1000)]
    assert g_exp[0] > g_exp[1] > g_exp[2] > 0
    slope = np.polyfit(np.log([50, 200, 1000]), np.log(g_exp), 1)[0]
    assert -0.6 < slope < -0.4
    # Simulated (least squares + ODE), averaged over training sets.
    grid = np.linspace(0, 0.6, 25)
    t = sim.time_grid(T, 32)
    g_sim = []
    for n in (50, 1000):
        w2 = np.zeros((6, len(grid)))
        for s in range(6):
            means, xs = _class_data(d, n, seed=100 + s)
            for j, g in enumerate(grid):
                c, C = sim.ode_map(sim.fit_least_squares(xs[0], 0, 2, t, g), 0)
                w2[s, j] = gaussian_w2_squared(means[0], np.eye(d), c, C)
        curve = (w2 - w2[:, :1]).mean(0)
        assert curve.min() < 0  # slight corruption helps (Theorem 2)
        g_sim.append(grid[np.argmin(curve)])
    assert g_sim[1] < g_sim[0]


def test_cli_end_to_end(tmp_path) -> None:
    out = tmp_path / "lab"
    rc = main(["theory", "gmm", "--d", "3,8", "--n", "6,400", "--gamma", "0,0.1,0.3",
               "--seeds", "2", "--sweep-points", "9", "--sweep-seeds", "3",
               "--sgd-iters", "150", "--sample-budget", "120000", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("table.csv", "table.json", "results.json", "provenance.json"):
        assert (out / name).is_file()
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["densities_2d.png", "entropy_gap_vs_g2d.png", "w2_vs_gamma.png"]
    res = json.loads((out / "results.json").read_text())
    rows = res["table"]
    assert len(rows) == 2 * 2 * 3
    assert res["all_within_tolerance"], [r for r in rows if not r["within_tolerance"]]
    singular = [r for r in rows if r["d"] == 8 and r["n"] == 6]  # n_k <= d: S singular
    assert all(r["entropy_gap_sim"] is None for r in singular)  # NaN -> null in JSON
    regular = [r for r in rows if r["n"] == 400 and r["gamma"] > 0]
    assert all(r["entropy_gap_sim"] > 0 for r in regular)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["config"]["gamma"] == [0.0, 0.1, 0.3]


@pytest.mark.parametrize("argv, needle", [
    (["--gamma", "0,-0.1"], "--gamma"),
    (["--classes", "2", "--weights", "1,2,3"], "--weights"),
    (["--d", "0"], "--d"),
])
def test_bad_input_is_a_user_error(tmp_path, capsys, argv, needle) -> None:
    rc = main(["theory", "gmm", *argv, "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_a_single_n_runs_and_says_why_there_is_no_slope(tmp_path, capsys) -> None:
    out = tmp_path / "lab"
    rc = main(["theory", "gmm", "--d", "4", "--n", "30", "--gamma", "0,0.3", "--seeds", "1",
               "--sweep-points", "5", "--sweep-seeds", "2", "--sgd-iters", "20", "--steps", "32",
               "--no-figures", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "log g* vs log n slope: needs two or more --n values" in text
    assert json.loads((out / "results.json").read_text())["sweep"]["g_star_sim_loglog_slope"] is None


def test_the_euler_w2_gap_error_is_the_integrator_not_the_closed_form(tmp_path) -> None:
    """Euler's W2^2-gap error shrinks as 1/steps towards the finite-T closed form (first
    order) and is within the lab's 5% tolerance with enough steps; Heun is within it at 128.
    So the closed form is right and the README's Euler example needs its step count."""
    from condnoise.theory.lab import GMMLabConfig, run_gmm_lab

    def worst(integrator: str, steps: int):
        cfg = GMMLabConfig(d=[8], n=[50], gamma=[0.0, 0.3], integrator=integrator, steps=steps,
                           sweep_points=5, sweep_seeds=2, sgd_iters=10, figures=False)
        res = run_gmm_lab(cfg, tmp_path / f"{integrator}-{steps}")
        return max(r["w2_gap_relerr"] for r in res.rows if r["gamma"] > 0), res

    e400, _ = worst("euler", 400)
    e1600, _ = worst("euler", 1600)
    e6400, res = worst("euler", 6400)
    assert e400 > 0.05  # outside the tolerance
    assert 3.0 < e400 / e1600 < 5.0 and 3.0 < e1600 / e6400 < 5.0  # error ~ 1/steps
    assert res.all_within_tolerance, res.rows
    heun, res = worst("heun", 128)
    assert res.all_within_tolerance and heun < e1600
