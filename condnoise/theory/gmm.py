"""Closed forms for the Gaussian-mixture theory of paper section 7 (numpy, float64).

Setting (paper section 7). Class k has data N(mu_k, I) in R^d; the training set holds n_k
samples with empirical mean ``m`` and empirical covariance ``S`` (1/n_k normalisation: the
covariance the least-squares fit sees). Forward process: Ornstein-Uhlenbeck,
``x_t = r_t x + s_t eps`` with ``r_t = e^-t`` and ``s_t = sqrt(1 - e^-2t)``. Denoiser of class
k: ``eps = W_t x_t + V_t c`` with ``c`` one-hot in R^K, corrupted in training as
``c + g xi``, ``xi ~ N(0, I_K)``. Reverse: probability-flow ODE ``dz = (z + score) dtau``
from ``z ~ N(0, I)`` at time T, with ``score = -eps / s_t``.

Least squares (Lemmas 1 and 2, derived here). Minimising
``E||eps - W x_t - V(e_k + g xi)||^2`` over the empirical class data, eps and xi: only the
column ``v = V e_k`` survives (the others only multiply noise), and with
``mu_t = r_t m``, ``Sigma_t = r_t^2 S + s_t^2 I`` and ``beta = g^2 / (1 + g^2)``

    v   = -W mu_t / (1 + g^2),       W = s_t (Sigma_t + beta mu_t mu_t^T)^-1.

For g = 0 this is the exact score of N(r_t m, Sigma_t) (Lemma 1). For g > 0 it is the exact
score of the OU-evolved Gaussian N(a, C) with

    a = m / (1 + g^2),               C = S + beta m m^T                       (*)

so the reverse ODE from N(0, I) at T generates, along the eigenvectors u_i (eigenvalues
lambda_i) of C, with ``sigma_T,i^2 = 1 + e^-2T (lambda_i - 1)``:

    mean_i = (1 - e^-T sqrt(lambda_i) / sigma_T,i) a_i,   var_i = lambda_i / sigma_T,i^2

(the finite-T forms, :func:`generated_finite_t`, which also covers stopping the ODE at
``t_end > 0``); T -> inf gives N(a, C) (Lemmas 3 and 4, :func:`generated_limit`).

Reading chosen where paper.md is terse. paper.md states Lemma 4 with an *isotropic*
inflation ``S + beta ||m||^2 I``. The least squares of the model exactly as stated gives the
mean shrinkage 1/(1+g^2) of Lemma 4 but a *rank-one* inflation ``beta m m^T`` along the
class mean (*). This module implements both: ``form="exact"`` (the default; what the
simulation reproduces) and ``form="paper"`` (Lemma 4 / Theorem 1 as printed). Theorem 1's
entropy gap is then ``1/2 log(1 + beta m^T S^-1 m)`` (exact) or
``1/2 sum_i log(1 + beta ||m||^2 / l_i)`` (paper, l_i eigenvalues of S). Both are
Theta(g^2 d) when ||m||^2 grows like d (class means with O(1) coordinates, the lab's
default); the paper form is Theta(g^2 d) for ||m|| = O(1).

Theorem 2 (expected W2^2 gain). With data N(mu, I) and m ~ N(mu, I/n) the mean part is
exact in expectation: ``E||mu - a||^2 = beta^2 ||mu||^2 + d / (n (1 + g^2)^2)``; the covariance
part is taken to leading order with S ~ I (:func:`expected_w2_gain`). Its small-g term is
``2 g^2 d / n`` (:func:`theorem2_rate` gives the constant-free rate ``g^2 d / n``), and the
optimum sits at g* ~ 1/sqrt(n).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from condnoise.stats import gaussian_w2_squared

Form = Literal["exact", "paper"]
FORMS: tuple[str, ...] = ("exact", "paper")


def ou_coefficients(t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """OU forward process (paper section 7): ``r_t = e^-t``, ``s_t = sqrt(1 - e^-2t)``."""
    t = np.asarray(t, dtype=np.float64)
    return np.exp(-t), np.sqrt(-np.expm1(-2.0 * t))


def shrink(g: float) -> float:
    """Mean shrinkage factor 1 / (1 + g^2) of Lemma 4."""
    return 1.0 / (1.0 + g * g)


def beta(g: float) -> float:
    """Variance factor g^2 / (1 + g^2) of Lemma 4 and Theorem 1."""
    return g * g / (1.0 + g * g)


def empirical_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical mean and covariance (1/n normalisation) of samples ``x`` [n, d]."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean(axis=0)
    xc = x - m
    return m, xc.T @ xc / x.shape[0]


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def generated_limit(
    m: np.ndarray, S: np.ndarray, g: float, form: Form = "exact"
) -> tuple[np.ndarray, np.ndarray]:
    """Generated N(mean, cov) as T -> inf: Lemma 3 (g = 0) and Lemma 4 (g > 0), see (*)."""
    _check_form(form)
    m = np.asarray(m, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    b = beta(g)
    if form == "exact":
        cov = S + b * np.outer(m, m)
    else:
        cov = S + b * float(m @ m) * np.eye(m.shape[0])
    return shrink(g) * m, cov


def generated_finite_t(
    m: np.ndarray, S: np.ndarray, g: float, T: float, form: Form = "exact", t_end: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generated N(mean, cov) after running the reverse ODE from N(0, I) at finite T.

    Along the eigenvectors of the T -> inf covariance C: ``mean_i = (1 - e^-T sqrt(l_i) /
    sigma_T,i) a_i`` and ``var_i = l_i / sigma_T,i^2`` with ``sigma_T,i^2 = 1 + e^-2T (l_i - 1)``.
    ``t_end > 0`` stops the ODE there (as a simulation must, s_t -> 0 at t = 0): then
    ``mean_i = (r_e - r_T sigma_e,i / sigma_T,i) a_i``, ``var_i = sigma_e,i^2 / sigma_T,i^2``.
    """
    if not np.isfinite(T) and t_end == 0:
        return generated_limit(m, S, g, form)
    a, C = generated_limit(m, S, g, form)
    lam, U = np.linalg.eigh(C)
    lam = np.clip(lam, 0.0, None)  # S is singular when n_k <= d
    sig2_T = 1.0 + np.exp(-2.0 * T) * (lam - 1.0)
    sig2_e = 1.0 + np.exp(-2.0 * t_end) * (lam - 1.0)
    gain = np.exp(-t_end) - np.exp(-T) * np.sqrt(sig2_e / sig2_T)
    mean = U @ (gain * (U.T @ a))
    cov = (U * (sig2_e / sig2_T)) @ U.T
    return mean, cov


def gaussian_entropy(cov: np.ndarray) -> float:
    """Differential entropy of N(., cov): 1/2 log det(2 pi e cov) (nats)."""
    cov = np.asarray(cov, dtype=np.float64)
    sign, logdet = np.linalg.slogdet(cov)
    if sign <= 0:
        raise ValueError("covariance is not positive definite")
    d = cov.shape[0]
    return 0.5 * (d * np.log(2.0 * np.pi * np.e) + logdet)


def entropy_gap(m: np.ndarray, S: np.ndarray, g: float, form: Form = "exact") -> float:
    """Theorem 1: H(corrupted) - H(clean) of the generated distributions (T -> inf).

    exact: ``1/2 log(1 + beta m^T S^-1 m)``; paper: ``1/2 sum_i log(1 + beta ||m||^2 / l_i)``.
    """
    _check_form(form)
    m = np.asarray(m, dtype=np.float64)
    b = beta(g)
    if form == "exact":
        return 0.5 * float(np.log1p(b * (m @ np.linalg.solve(S, m))))
    lam = np.linalg.eigvalsh(np.asarray(S, dtype=np.float64))
    return 0.5 * float(np.sum(np.log1p(b * (m @ m) / lam)))


def w2_to_truth(
    mu: np.ndarray, m: np.ndarray, S: np.ndarray, g: float, T: float = np.inf,
    form: Form = "exact", t_end: float = 0.0,
) -> float:
    """W2^2 between the true class distribution N(mu, I) and the generated one."""
    mean, cov = generated_finite_t(m, S, g, T, form, t_end)
    return gaussian_w2_squared(mu, np.eye(len(mu)), mean, cov)


def w2_gain(
    mu: np.ndarray, m: np.ndarray, S: np.ndarray, g: float, T: float = np.inf,
    form: Form = "exact",
) -> float:
    """W2^2(P, clean) - W2^2(P, corrupted) for one training set (Theorem 2's quantity)."""
    return w2_to_truth(mu, m, S, 0.0, T, form) - w2_to_truth(mu, m, S, g, T, form)


def expected_w2_gain(mu_norm2: float, d: int, n: int, g: float | np.ndarray) -> np.ndarray:
    """Leading-order E[W2^2(P, clean) - W2^2(P, corrupted)] over training sets (Theorem 2).

    Mean part exact in expectation: ``d/n (1 - (1+g^2)^-2) - beta^2 ||mu||^2``; covariance part
    to leading order with S ~ I: ``-(sqrt(1 + beta q) - 1)^2``, ``q = E||m||^2 = ||mu||^2 + d/n``.
    """
    g = np.asarray(g, dtype=np.float64)
    b = g * g / (1.0 + g * g)
    q = mu_norm2 + d / n
    mean_part = d / n * (1.0 - 1.0 / (1.0 + g * g) ** 2) - b * b * mu_norm2
    return mean_part - (np.sqrt(1.0 + b * q) - 1.0) ** 2


def theorem2_rate(d: int, n: int, g: float | np.ndarray) -> np.ndarray:
    """The Omega(g^2 d / n) rate of Theorem 2 (constant-free; the leading term is twice it)."""
    return np.asarray(g, dtype=np.float64) ** 2 * d / n


def optimal_gamma(mu_norm2: float, d: int, n: int, g_max: float = 2.0) -> float:
    """g maximising :func:`expected_w2_gain` (bounded scalar search)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda g: -float(expected_w2_gain(mu_norm2, d, n, g)),
        bounds=(0.0, g_max), method="bounded", options={"xatol": 1e-6},
    )
    return float(res.x)
