"""Condition-embedding perturbations: CEP (paper Sec. 3) and the baselines it is compared to.

Every perturbation maps the clean embedding ``c = c_theta(y)`` (a
:class:`~condnoise.conditioning.embedding.CondEmbedding`: class vectors as one token, or a
caption's token embeddings ``[B, L, D]``) to ``c + delta`` in training mode only (eval mode
returns ``c`` unchanged, so sampling is never perturbed) and while ``enabled`` (an explicit
flag, True by default: an LCM distillation's target network sets it to False, whatever its
mode). Padding tokens and rows holding
the null condition (classifier-free-guidance dropout: the null class, the empty caption)
are never perturbed: the null embedding is the unconditional anchor of CFG, not a
condition, and CEP targets the conditions (paper Sec. 3 leaves this open; this is our
choice). The scale uses the token width D: ``gamma / sqrt(D)`` per coordinate of every
real token. ``pooled`` is recomputed from the perturbed tokens.

Randomness: fresh noise comes from ``self.generator`` when set, else from the global torch
RNG of the embedding's device, so a trainer that checkpoints the RNG states resumes bitwise.
``cep-fixed`` draws nothing: its membership and noise are a pure counter-based hash of
``(seed, sample_index)`` (:mod:`condnoise.rng`), identical across steps, resumes, workers
and ranks; ``random-flip`` (a label re-drawn, or a caption swapped with another sample's)
hashes ``(seed, step, sample_index)`` (random data corruption, paper appendix E.4).

Any perturbation also accepts ``ip`` (xi of input perturbation, Ning et al. 2023): stored as
``input_perturbation`` and applied to ``x_t`` by :func:`condnoise.diffusion.loss.diffusion_loss`.

``forward(c, cond, *, encoder, sample_index=None, step=None)`` takes a CondEmbedding (and
returns one) or, for class models, the class vectors ``[B, D]`` (and returns ``[B, D]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from condnoise import rng
from condnoise.conditioning.embedding import CondEmbedding, token_shift
from condnoise.conditioning.noise import cep_delta, cep_sigma
from condnoise.errors import UserError


# ----------------------------------------------------------------------------- base class
class Perturbation(nn.Module):
    """Base class: subclasses implement :meth:`perturb`; the base handles eval mode, the
    null-row and padding masks and the ``mean_l2_shift`` statistic (paper Fig. 8a x-axis)."""

    name = "none"

    def __init__(self, *, ip: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= float(ip) < 10.0:
            raise UserError(f"perturbation field 'ip' (input perturbation xi) must be in [0, 10), got {ip}")
        self.input_perturbation = float(ip)
        self.generator: torch.Generator | None = None
        #: False: never perturb, in any mode (e.g. the target network of LCM distillation)
        self.enabled = True
        self.register_buffer("_l2_sum", torch.zeros(()), persistent=False)
        self.register_buffer("_changed", torch.zeros(()), persistent=False)
        self.register_buffer("_rows", torch.zeros(()), persistent=False)

    def params(self) -> dict[str, Any]:
        """The parameters this perturbation was built with (for configs and logs)."""
        return {"ip": self.input_perturbation}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params().items())

    def perturb(
        self,
        emb: CondEmbedding,
        cond: torch.Tensor,
        encoder: nn.Module,
        sample_index: torch.Tensor | None,
        step: int | None = None,
    ) -> CondEmbedding:
        return emb

    def forward(
        self,
        c: CondEmbedding | torch.Tensor,
        cond: torch.Tensor,
        *,
        encoder: nn.Module,
        sample_index: torch.Tensor | None = None,
        step: int | None = None,
    ) -> CondEmbedding | torch.Tensor:
        """Return the (training-mode) perturbed embedding; null rows and padding untouched.

        ``step`` (the optimiser step) keys the counter-based draws of ``random-flip``.
        """
        if isinstance(c, torch.Tensor):  # class vectors [B, D] -> [B, D]
            emb = CondEmbedding.from_vectors(c, encoder.is_null(cond))
            return self.forward(emb, cond, encoder=encoder, sample_index=sample_index, step=step).pooled
        if not (self.training and self.enabled) or type(self).perturb is Perturbation.perturb:
            return c
        out = self.perturb(c, cond, encoder, sample_index, step)
        real = ~c.null
        keep = (c.mask | out.mask) & real[:, None]
        tokens = torch.where(keep[..., None], out.tokens, c.tokens)
        result = c.with_tokens(tokens, torch.where(real[:, None], out.mask, c.mask))
        with torch.no_grad():
            shift = token_shift(c, result)
            self._l2_sum += shift.sum()
            self._changed += (shift > 0).sum()
            self._rows += real.sum()
        return result

    def stats(self, reset: bool = True) -> dict[str, float]:
        """``mean_l2_shift`` = mean over perturbable (non-null) training rows since the last
        reset of the row's mean per-token ``||c' - c||`` (for classes: the vector's shift),
        ``perturbed_fraction`` = share of those rows that changed."""
        rows = float(self._rows)
        out = {
            "mean_l2_shift": float(self._l2_sum) / rows if rows else 0.0,
            "perturbed_fraction": float(self._changed) / rows if rows else 0.0,
        }
        if reset:
            for b in (self._l2_sum, self._changed, self._rows):
                b.zero_()
        return out

    def _rand(self, c: torch.Tensor) -> torch.Tensor:
        return torch.rand(c.shape, device=c.device, dtype=c.dtype, generator=self.generator)


class NoPerturbation(Perturbation):
    name = "none"


def _check_gamma(gamma: float) -> float:
    if not 0.0 <= float(gamma) <= 1e4:
        raise UserError(f"perturbation field 'gamma' must be in [0, 1e4], got {gamma}")
    return float(gamma)


class UniformCEP(Perturbation):
    """CEP-U: ``delta ~ U(-gamma/sqrt(d), gamma/sqrt(d))^d``, fresh every step (Sec. 3).
    ``E||delta||^2 = gamma^2 / 3``."""

    name = "cep-u"

    def __init__(self, gamma: float = 1.0, *, ip: float = 0.0) -> None:
        super().__init__(ip=ip)
        self.gamma = _check_gamma(gamma)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma, **super().params()}

    def perturb(self, emb, cond, encoder, sample_index, step=None):
        return emb.with_tokens(emb.tokens + cep_delta(emb.tokens, self.gamma, "uniform",
                                                      generator=self.generator))  # fmt: skip


class GaussianCEP(Perturbation):
    """CEP-G: ``delta ~ N(0, sigma^2 I)``, fresh every step (Sec. 3).

    ``scale="std"`` (default): sigma = gamma/sqrt(d), so ``E||delta||^2 = gamma^2``.
    ``scale="variance"``: the paper's literal ``N(0, gamma/sqrt(d) I)``, sigma^2 = gamma/sqrt(d).
    """

    name = "cep-g"

    def __init__(self, gamma: float = 1.0, scale: str = "std", *, ip: float = 0.0) -> None:
        super().__init__(ip=ip)
        if scale not in ("std", "variance"):
            raise UserError(f"cep-g field 'scale' must be 'std' or 'variance', got {scale!r}")
        self.gamma = _check_gamma(gamma)
        self.scale = scale

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "scale": self.scale, **super().params()}

    def sigma(self, d: int) -> float:
        return cep_sigma(self.gamma, d, self.scale)

    def perturb(self, emb, cond, encoder, sample_index, step=None):
        delta = cep_delta(emb.tokens, self.gamma, "gaussian", scale=self.scale, generator=self.generator)
        return emb.with_tokens(emb.tokens + delta)


class FixedCEP(Perturbation):
    """Fixed CEP (paper appendix E.4): the perturbed samples and their noise are chosen once.

    Sample ``i`` is perturbed iff ``u(seed, i) < fraction`` and then always gets the same
    delta (uniform or gaussian, CEP-U / CEP-G scale), a pure hash of ``(seed, i)``.
    ``fraction`` defaults to 1.0: every sample keeps one fixed delta, the fixed counterpart
    of fresh CEP at the same gamma (set it to e.g. 0.05 to mirror a corruption ratio).
    Needs ``sample_index`` (the dataset index of each row).
    """

    name = "cep-fixed"

    def __init__(
        self,
        gamma: float = 1.0,
        noise: str = "uniform",
        fraction: float = 1.0,
        seed: int = 0,
        *,
        ip: float = 0.0,
    ) -> None:
        super().__init__(ip=ip)
        if noise not in ("uniform", "gaussian"):
            raise UserError(f"cep-fixed field 'noise' must be 'uniform' or 'gaussian', got {noise!r}")
        if not 0.0 <= float(fraction) <= 1.0:
            raise UserError(f"cep-fixed field 'fraction' must be in [0, 1], got {fraction}")
        self.gamma, self.noise, self.fraction, self.seed = _check_gamma(gamma), noise, float(fraction), int(seed)

    def params(self) -> dict[str, Any]:
        p = {"gamma": self.gamma, "noise": self.noise, "fraction": self.fraction, "seed": self.seed}
        return {**p, **super().params()}

    def fixed_delta(self, sample_index: torch.Tensor, d: int, length: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(member bool [B], delta float32 [B, length, d])`` for dataset indices int64 [B];
        coordinate j of token position p is keyed by ``(index, p * d + j)`` (one token:
        ``(index, j)``)."""
        idx = sample_index.long()
        member = rng.uniform(self.seed, "cep-fixed/member", idx) < self.fraction
        cols = torch.arange(length, device=idx.device)[:, None] * d + torch.arange(d, device=idx.device)
        if self.noise == "uniform":
            z = 2 * rng.uniform(self.seed, "cep-fixed/delta", idx[:, None, None], cols) - 1
        else:
            z = rng.normal(self.seed, "cep-fixed/delta", idx[:, None, None], cols)
        return member, (z * (self.gamma / math.sqrt(d))).float()

    def perturb(self, emb, cond, encoder, sample_index, step=None):
        if sample_index is None:
            raise UserError("perturbation cep-fixed needs the dataset sample_index of every row")
        if sample_index.shape != cond.shape[:1]:
            raise UserError(f"sample_index shape {tuple(sample_index.shape)} != conditions "
                            f"{tuple(cond.shape[:1])}")  # fmt: skip
        c = emb.tokens
        member, delta = self.fixed_delta(sample_index.to(c.device), c.shape[-1], c.shape[1])
        return emb.with_tokens(c + delta.to(c.dtype) * member[:, None, None].to(c.dtype))


class EmbeddingDropout(Perturbation):
    """Dropout with probability ``p`` on the condition embedding (baseline, Sec. 3; p = 0.1)."""

    name = "dropout"

    def __init__(self, p: float = 0.1, *, ip: float = 0.0) -> None:
        super().__init__(ip=ip)
        if not 0.0 <= float(p) < 1.0:
            raise UserError(f"dropout field 'p' must be in [0, 1), got {p}")
        self.p = float(p)

    def params(self) -> dict[str, Any]:
        return {"p": self.p, **super().params()}

    def perturb(self, emb, cond, encoder, sample_index, step=None):
        keep = self._rand(emb.tokens) >= self.p
        return emb.with_tokens(emb.tokens * keep / (1 - self.p))


def _class_table(encoder: nn.Module, name: str) -> torch.Tensor:
    if not hasattr(encoder, "class_table"):
        raise UserError(f"perturbation {name} needs a class-label encoder (model conditions on classes)")
    return encoder.class_table()


class LabelSmoothing(Perturbation):
    """Label smoothing in embedding space (baseline, Sec. 3; eps = 0.1):
    ``c' = (1 - eps) E[y] + eps * mean_{k != y} E[k]``."""

    name = "label-smoothing"

    def __init__(self, eps: float = 0.1, *, ip: float = 0.0) -> None:
        super().__init__(ip=ip)
        if not 0.0 <= float(eps) <= 1.0:
            raise UserError(f"label-smoothing field 'eps' must be in [0, 1], got {eps}")
        self.eps = float(eps)

    def params(self) -> dict[str, Any]:
        return {"eps": self.eps, **super().params()}

    def perturb(self, emb, cond, encoder, sample_index, step=None):
        table = _class_table(encoder, self.name)
        k = table.shape[0]
        if k < 2:
            raise UserError("label-smoothing needs at least 2 classes")
        c = emb.tokens[:, 0]
        others = (table.sum(0, keepdim=True) - c) / (k - 1)
        return emb.with_tokens(((1 - self.eps) * c + self.eps * others.to(c.dtype))[:, None])


class RandomFlip(Perturbation):
    """Random data corruption (paper Sec. 2 and appendix E.4), re-drawn at every step.

    Class labels: each label is re-drawn with probability ``eta`` to a *different* class
    (from ``prior``, uniform when None) and the new label's embedding replaces the clean one;
    the draws are :func:`condnoise.rng.relabel` (the data stage's random corruption).
    Captions (text models): each caption is replaced with probability ``eta`` by the caption
    of another training sample ``j != i`` (the paper's text swap, made random per step);
    draws from streams ``swap/flip`` and ``swap/partner``, and the training conditions come
    from :meth:`bind_conditions` (the trainer calls it).

    Every draw is a pure function of ``(seed, step, sample_index)``, so it needs both.
    """

    name = "random-flip"

    def __init__(
        self, eta: float = 0.05, prior: list[float] | None = None, seed: int = 0, *, ip: float = 0.0
    ) -> None:
        super().__init__(ip=ip)
        if not 0.0 <= float(eta) <= 1.0:
            raise UserError(f"random-flip field 'eta' must be in [0, 1], got {eta}")
        if prior is not None:
            pr = torch.as_tensor(prior, dtype=torch.float64)
            if pr.dim() != 1 or pr.numel() < 2 or (pr < 0).any() or int((pr > 0).sum()) < 2:
                raise UserError("random-flip field 'prior' must list >= 2 non-negative class weights")
            prior = [float(x) for x in pr / pr.sum()]
        self.eta, self.prior, self.seed = float(eta), prior, int(seed)
        self.table: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"eta": self.eta, "prior": self.prior, "seed": self.seed, **super().params()}

    def class_prior(self, num_classes: int) -> list[float]:
        """``prior`` (checked against the model's class count), uniform when None."""
        if self.prior is not None and len(self.prior) != num_classes:
            raise UserError(
                f"random-flip prior has {len(self.prior)} entries but the model has {num_classes} classes"
            )
        return self.prior or [1.0 / num_classes] * num_classes

    def bind_conditions(self, table: torch.Tensor) -> None:
        """The training set's conditions in dataset-index order (token ids ``[N, L]``)."""
        self.table = table

    def swap_partners(self, sample_index: torch.Tensor, step: int, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(swapped bool [B], partner index int64 [B])``; a partner is never the row itself."""
        idx = sample_index.long()
        swap = (rng.uniform(self.seed, "swap/flip", step, idx) < self.eta) & (n > 1)
        j = (rng.uniform(self.seed, "swap/partner", step, idx) * (n - 1)).floor().long()
        return swap, j + (j >= idx).long()

    def perturb(self, emb, cond, encoder, sample_index, step=None):
        if sample_index is None or step is None:
            raise UserError("perturbation random-flip needs the sample_index and step of every batch")
        if getattr(encoder, "kind", "class") == "text":
            return self._swap(emb, cond, encoder, sample_index, step)
        k = encoder.num_classes
        real = cond.clamp(max=k - 1)  # null rows are restored by the caller
        new = rng.relabel(real, sample_index.to(cond.device), step, prior=self.class_prior(k),
                          ratio=self.eta, seed=self.seed)
        return emb.with_tokens(encoder.encode(new).to(emb.tokens.dtype)[:, None])

    def _swap(self, emb: CondEmbedding, cond: torch.Tensor, encoder: nn.Module,
              sample_index: torch.Tensor, step: int) -> CondEmbedding:  # fmt: skip
        if self.prior is not None:
            raise UserError("random-flip field 'prior' is for class labels; captions are swapped")
        if self.table is None:
            raise UserError("random-flip on captions needs the training captions (bind_conditions)")
        swap, partner = self.swap_partners(sample_index.to(cond.device), step, len(self.table))
        if not bool(swap.any()):
            return emb
        new = encoder.embed(self.table[partner[swap].cpu()].to(cond.device))
        tokens, mask = emb.tokens.clone(), emb.mask.clone()
        tokens[swap], mask[swap] = new.tokens.to(tokens.dtype), new.mask
        return emb.with_tokens(tokens, mask)


# ----------------------------------------------------------------------------- registry
PERTURBATIONS: dict[str, type[Perturbation]] = {
    cls.name: cls
    for cls in (NoPerturbation, UniformCEP, GaussianCEP, FixedCEP, EmbeddingDropout, LabelSmoothing, RandomFlip)
}
#: ``ip``: no embedding perturbation, input perturbation xi = 0.1 (Ning et al. 2023).
IP_DEFAULT_XI = 0.1


def perturbation_choices() -> dict[str, dict[str, Any]]:
    """Every valid perturbation name -> its parameters and their defaults."""
    import inspect

    out: dict[str, dict[str, Any]] = {}
    for name, cls in PERTURBATIONS.items():
        sig = inspect.signature(cls.__init__)
        out[name] = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    out["ip"] = {"ip": IP_DEFAULT_XI}
    return out


def build_perturbation(name: str = "none", **params: Any) -> Perturbation:
    """Build a perturbation by name (``none, cep-u, cep-g, cep-fixed, dropout,
    label-smoothing, random-flip, ip``); unknown names / fields raise a UserError."""
    choices = perturbation_choices()
    if name not in choices:
        raise UserError(f"unknown perturbation {name!r}; choose one of {', '.join(choices)}")
    unknown = sorted(set(params) - set(choices[name]))
    if unknown:
        raise UserError(
            f"perturbation {name}: unknown field(s) {', '.join(unknown)}; "
            f"valid: {', '.join(choices[name]) or '(none)'}"
        )
    if name == "ip":
        return NoPerturbation(ip=params.get("ip", IP_DEFAULT_XI))
    try:
        return PERTURBATIONS[name](**params)
    except (TypeError, ValueError) as e:
        raise UserError(f"perturbation {name}: bad parameter value ({e})") from None
