"""Simulation of paper section 7: sample a Gaussian mixture, fit the class-wise linear
denoiser ``eps = W_t x_t + V_t c`` (least squares, Lemmas 1-2, or SGD), run the reverse
probability-flow ODE and measure what it generates.

Everything here is computed from data and the ODE, never from the closed forms of
:mod:`condnoise.theory.gmm`; the lab compares the two.

- Least squares: the normal equations of ``E||eps - Theta z||^2`` with regressors
  ``z = [x_t; e_k + g xi]``, their second moments taken exactly over eps ~ N(0, I) and
  xi ~ N(0, I_K) and empirically over the class's training samples. With g = 0 the columns
  of V for the other classes are unidentified; they are set to 0 (minimum-norm solution).
- SGD: the same parameters, one (W_j, V_j) per ODE node t_j (the piecewise linear network),
  trained jointly with SGD + momentum on freshly sampled (x_t, eps, xi) mini-batches.
- ODE: ``dz/dtau = z + score(z, t)``, ``score = -(W_t z + V_t e_k) / s_t``, from T down to
  ``t_min`` (default 1e-5, where s_t is still > 0) on a grid uniform in log-SNR, Euler or Heun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from condnoise.theory.gmm import ou_coefficients

Integrator = Literal["euler", "heun"]
INTEGRATORS: tuple[str, ...] = ("euler", "heun")


def class_means(rng: np.random.Generator, num_classes: int, d: int, norm: float) -> np.ndarray:
    """K class means with random directions and Euclidean norm ``norm`` each: [K, d]."""
    dirs = rng.standard_normal((num_classes, d))
    return norm * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def class_sizes(n: int, weights: np.ndarray | None, num_classes: int) -> list[int]:
    """Samples per class: ``n`` each, or ``round(n K w_k)`` (at least 2) for weights w."""
    if weights is None:
        return [int(n)] * num_classes
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return [max(2, int(round(n * num_classes * wk))) for wk in w]


def sample_mixture(
    rng: np.random.Generator, means: np.ndarray, sizes: list[int]
) -> list[np.ndarray]:
    """Training samples of each class: ``x ~ N(mu_k, I)``, one [n_k, d] array per class."""
    return [mu + rng.standard_normal((nk, means.shape[1])) for mu, nk in zip(means, sizes)]


def time_grid(T: float, steps: int, t_min: float = 1e-5) -> np.ndarray:
    """ODE nodes from T down to t_min (descending, ``steps + 1`` values).

    Uniform in log-SNR ``log(r_t^2 / s_t^2)``: dense near t = 0, where the drift along
    low-variance directions of S is stiff (rate about 1 / l_i).
    """
    lam_hi = -np.log(np.expm1(2.0 * T))
    lam_lo = -np.log(np.expm1(2.0 * t_min))
    lam = np.linspace(lam_hi, lam_lo, steps + 1)
    t = 0.5 * np.log1p(np.exp(-lam))
    t[0], t[-1] = T, t_min
    return t


@dataclass
class LinearDenoiser:
    """Per-node parameters ``theta[j] = [W_j | V_j]`` ([L, d, d + K]) on nodes ``t`` [L]."""

    t: np.ndarray
    theta: np.ndarray
    d: int

    @property
    def W(self) -> np.ndarray:
        return self.theta[:, :, : self.d]

    @property
    def V(self) -> np.ndarray:
        return self.theta[:, :, self.d :]

    def score_coefficients(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``score(z, t_j) = -(A_j z + b_j)``: ``A = W / s``, ``b = V e_k / s`` (clean condition)."""
        _, s = ou_coefficients(self.t)
        return self.W / s[:, None, None], self.V[:, :, k] / s[:, None]


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=0), x.T @ x / x.shape[0]


def fit_least_squares(x: np.ndarray, k: int, num_classes: int, t: np.ndarray, g: float
                      ) -> LinearDenoiser:
    """Closed-form least squares of ``eps = W x_t + V (e_k + g xi)`` on class-k data x [n, d]."""
    n, d = x.shape
    K = num_classes
    xbar, m2 = _moments(x)
    r, s = ou_coefficients(t)
    L = len(t)
    cols = np.arange(d + K) if g > 0 else np.r_[np.arange(d), d + k]
    G = np.zeros((L, d + K, d + K))
    G[:, :d, :d] = r[:, None, None] ** 2 * m2 + s[:, None, None] ** 2 * np.eye(d)
    G[:, :d, d + k] = r[:, None] * xbar
    G[:, d + k, :d] = r[:, None] * xbar
    G[:, d:, d:] = g * g * np.eye(K)
    G[:, d + k, d + k] += 1.0
    B = np.zeros((L, d + K, d))  # E[z eps^T]
    B[:, :d, :] = s[:, None, None] * np.eye(d)
    sub = G[:, cols][:, :, cols]
    theta_t = np.linalg.solve(sub, B[:, cols, :])  # [L, |cols|, d]
    theta = np.zeros((L, d, d + K))
    theta[:, :, cols] = np.swapaxes(theta_t, 1, 2)
    return LinearDenoiser(t=np.asarray(t, np.float64), theta=theta, d=d)


def fit_sgd(
    x: np.ndarray, k: int, num_classes: int, t: np.ndarray, g: float, *,
    iters: int = 3000, batch: int = 256, lr: float = 0.05, momentum: float = 0.9,
    seed: int = 0, progress: bool = False,
) -> tuple[LinearDenoiser, list[float]]:
    """Train the piecewise linear network (one [W_j | V_j] per node) with SGD.

    Loss per step: mean over nodes and batch of ``||eps - W_j x_t - V_j (e_k + g xi)||^2 / d``
    on fresh draws; the learning rate decays with a cosine to 0 and the last 20% of iterates
    are averaged (Polyak), which takes SGD to the least-squares optimum rather than its noise
    floor. Returns the denoiser and the loss curve.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batched products: one thread is fastest on a shared CPU
    try:
        return _fit_sgd(torch, x, k, num_classes, t, g, iters, batch, lr, momentum, seed,
                        progress)
    finally:
        torch.set_num_threads(threads)


def _fit_sgd(torch: Any, x: np.ndarray, k: int, num_classes: int, t: np.ndarray, g: float,
             iters: int, batch: int, lr: float, momentum: float, seed: int, progress: bool
             ) -> tuple[LinearDenoiser, list[float]]:
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    K = num_classes
    L = len(t)
    xs = torch.as_tensor(x, dtype=torch.float64)
    r, s = (torch.as_tensor(a, dtype=torch.float64) for a in ou_coefficients(t))
    theta = torch.zeros(L, d, d + K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + np.cos(np.pi * min(i, iters) / iters)))
    onehot = torch.zeros(K, dtype=torch.float64)
    onehot[k] = 1.0
    avg = torch.zeros_like(theta)
    avg_from = int(0.8 * iters)
    losses: list[float] = []
    for i in tqdm(range(iters), desc="sgd", disable=not progress, leave=False):
        idx = torch.randint(0, n, (L, batch), generator=gen)
        eps = torch.randn(L, batch, d, generator=gen, dtype=torch.float64)
        xi = torch.randn(L, batch, K, generator=gen, dtype=torch.float64)
        xt = r[:, None, None] * xs[idx] + s[:, None, None] * eps
        z = torch.cat([xt, onehot + g * xi], dim=2)
        pred = torch.bmm(z, theta.transpose(1, 2))
        loss = ((pred - eps) ** 2).sum(-1).mean() / d
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i >= avg_from:
            avg += theta.detach()
    avg /= iters - avg_from
    return LinearDenoiser(t=np.asarray(t, np.float64), theta=avg.numpy(), d=d), losses


def integrate_ode(z: np.ndarray, A: np.ndarray, b: np.ndarray, t: np.ndarray,
                  method: Integrator = "heun") -> np.ndarray:
    """Reverse PF ODE ``dz/dtau = z - (A_j z + b_j)`` from t[0] = T to t[-1] (rows of z [N, d])."""
    if method not in INTEGRATORS:
        raise ValueError(f"integrator must be one of {INTEGRATORS}, got {method!r}")
    with single_threaded_blas():
        return _integrate(np.array(z, dtype=np.float64), A, b, t, method)


def single_threaded_blas() -> Any:
    """BLAS limited to one thread: the matrices here are small (d x d), and several BLAS
    threads on a shared CPU slow these many small products down by an order of magnitude."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _integrate(z: np.ndarray, A: np.ndarray, b: np.ndarray, t: np.ndarray, method: str
               ) -> np.ndarray:
    def f(zz: np.ndarray, j: int) -> np.ndarray:
        return zz - zz @ A[j].T - b[j]

    for j in range(len(t) - 1):
        h = t[j] - t[j + 1]
        k1 = f(z, j)
        if method == "euler":
            z = z + h * k1
        else:
            k2 = f(z + h * k1, j + 1)
            z = z + 0.5 * h * (k1 + k2)
    return z


def generate(den: LinearDenoiser, k: int, z_T: np.ndarray, method: Integrator = "heun"
             ) -> np.ndarray:
    """Generated samples of class k from the starting points z_T [N, d] ~ N(0, I)."""
    A, b = den.score_coefficients(k)
    return integrate_ode(z_T, A, b, den.t, method)


def ode_affine_map(den: LinearDenoiser, k: int, method: Integrator = "heun"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The discretised ODE is affine in its start point: ``z_0 = M z_T + c``. Returns
    ``(c, M)``, found by integrating the d + 1 points 0, e_1, ..., e_d."""
    d = den.d
    pts = generate(den, k, np.vstack([np.zeros((1, d)), np.eye(d)]), method)
    c = pts[0]
    return c, (pts[1:] - c).T


def ode_map(den: LinearDenoiser, k: int, method: Integrator = "heun"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Exact generated Gaussian of the discretised ODE for z_T ~ N(0, I): ``(c, M M^T)``."""
    c, M = ode_affine_map(den, k, method)
    return c, M @ M.T


def antithetic_normal(rng: np.random.Generator, num: int, d: int) -> np.ndarray:
    """``num`` (rounded up to even) N(0, I) starting points in antithetic pairs (z, -z)."""
    half = rng.standard_normal(((num + 1) // 2, d))
    return np.vstack([half, -half])


@dataclass
class SampleStats:
    """Moments of generated samples and the derived Gaussian entropy / W2^2 to the truth."""

    mean: np.ndarray
    cov: np.ndarray
    entropy: float
    w2: float


def sample_stats(z: np.ndarray, mu: np.ndarray, *, entropy: bool = True) -> SampleStats:
    """Mean, covariance, Gaussian plug-in differential entropy and W2^2 to N(mu, I) of z.

    The generated law is Gaussian (a linear flow of N(0, I)), so the plug-in estimates are
    the right ones. ``entropy=False`` (singular covariance, n_k <= d) gives NaN entropy.
    """
    from condnoise.stats import gaussian_w2_squared
    from condnoise.theory.gmm import gaussian_entropy

    mean = z.mean(axis=0)
    cov = np.cov(z, rowvar=False)
    return SampleStats(mean=mean, cov=cov,
                       entropy=gaussian_entropy(cov) if entropy else float("nan"),
                       w2=gaussian_w2_squared(mu, np.eye(len(mu)), mean, cov))
