"""Cost model of the study's cells (the ``--dry-run`` plan): throughputs scaled by compute.

Reference rates are those of a DiT with hidden 128, depth 6, patch 4 on 32x32x1 images
on 2 CPU cores (the official DiT blocks: 242 training img/s, 787 forward img/s; the
"anchor" column of BENCHMARKS.md) and of DiT-XL/2 on 32x32x4 latents on one H100 in bf16
(planning figures of the official code, 355 training / 1,077 forward img/s; not measured
in this repository). A model's rate is the reference divided by its compute relative to
the reference model. A study's ``cost`` section replaces the reference by measured rates
of its own first architecture (``train_img_per_s``, ``forward_img_per_s`` on 2 idle CPU
cores; other architectures are scaled by compute relative to it) and of the evaluation
(``eval_img_per_s``). The plan replaces these estimates by measured durations where the
cell log has them (:func:`condnoise.study.grid.plan_table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REF_TRAIN_IMG_PER_S = 242.0
REF_FORWARD_IMG_PER_S = 787.0
REF_COMPUTE = 128**2 * 6 * (32 // 4) ** 2
COMPUTE_EXPONENT = 0.9  # fitted to the same reference's hidden 192/256, depth 6/8, patch 2/4 rates
GPU_XL2 = {"family": "dit", "size": "XL/2", "latent_shape": [4, 32, 32]}
GPU_TRAIN_IMG_PER_S, GPU_FORWARD_IMG_PER_S = 355.0, 1077.0
GPU_CAP_TRAIN, GPU_CAP_FORWARD = 20000.0, 60000.0  # small models: per-step overheads cap the rate
GPU_EVAL_IMG_PER_S = 3000.0
FMNIST_CLASSIFIER_IMG_PER_S = 4000.0  # the small CNN extractor + metrics, 2 cores
INCEPTION_IMG_PER_S = 8.4  # the Inception extractor on 2 cores (README, Evaluation)
CORRUPT_SECONDS = 2.0
THEORY_SECONDS = 20.0
OVERHEAD = {"train": 4.0, "sample": 1.5, "evaluate": 2.0, "walk": 1.5}  # load / build, s
#: an LCD step per image: the student's forward + backward (~3 forwards, as training), the
#: teacher's guided forward on a doubled batch (2) and the target's forward (1): ~2x training
DISTILL_FACTOR = 2.0
#: a fine-tuning step per image relative to a training step of the base: ControlNet on the
#: tiny U-Net at 16 px took 81 CPU-seconds for 300 x 32 against the base's 100 (BENCHMARKS.md,
#: "ControlNet fine-tuning": the frozen base needs no weight gradients); a T2I-Adapter, a
#: small convolutional net beside the frozen base, assumed a little cheaper (unmeasured)
FINETUNE_FACTOR = {"controlnet": 0.8, "t2i-adapter": 0.7}
#: training-split sizes for epoch-based fine-tuning costs (``finetune.epochs``) when the
#: study's data section has no max_samples; other sources: ``cost.train_images``
TRAIN_IMAGES = {"fashion-mnist": 60000, "digits": 60000}
#: fmnist-vq-f4 (0.68M parameters, 32 px): 2000 x 32 images in 1,364 CPU-seconds on one loaded
#: thread (README, "Latent autoencoders") = 47 img per CPU-second; scaled to an idle core as
#: fmnist-quick does (x1.9) and assumed no faster on two (small convolutions): ~90 img/s
AE_TRAIN_IMG_PER_S, AE_GPU_IMG_PER_S = 90.0, 3000.0
#: encoding a batch on the fly (latent models without a cache): the encoder's forward, about a
#: sixth of an autoencoder training step per image (rough)
AE_ENCODE_IMG_PER_S = 6 * AE_TRAIN_IMG_PER_S


@dataclass(frozen=True)
class Cost:
    """Estimated seconds of one cell on 2 CPU cores and on one H100."""

    cpu: float
    gpu: float


def model_compute(model: dict[str, Any], image_shape: tuple[int, int, int]) -> float:
    """Relative compute of one forward pass versus the reference DiT (1.0 = reference)."""
    from condnoise.models.config import ModelConfig

    cfg = ModelConfig.from_dict(model, origin="cost model")
    arch = cfg.architecture()
    c, h, w = cfg.latent_shape or image_shape
    if cfg.family == "dit":
        tokens = (h // arch["patch"]) * (w // arch["patch"])
        ratio = arch["hidden"] ** 2 * arch["depth"] * tokens / REF_COMPUTE
    elif cfg.family == "conv-unet":  # fitted to the tiny / xs / s rates in BENCHMARKS.md
        width = sum(ch**2 / 4**k for k, ch in enumerate(arch["channels"])) / 2048
        ratio = 0.42 * (width * arch["layers_per_block"] * h * w / 256 + 0.13)
    else:  # U-Net: width^2 x resolution x blocks, relative to a DiT-sized budget; rough
        width = sum(ch**2 for ch in arch["channels"]) / len(arch["channels"])
        ratio = 6.0 * width * arch["layers_per_block"] * h * w / (128**2 * 6 * 1024)
    return max(ratio, 1e-3) ** COMPUTE_EXPONENT * max(c, 1) ** 0.1


class CostModel:
    """Per-stage estimates for a study: ``overrides`` are the study's ``cost`` section
    (``train_img_per_s``, ``forward_img_per_s``: measured CPU rates of ``ref_model``, the
    study's first architecture; ``eval_img_per_s``)."""

    def __init__(self, image_shape: tuple[int, int, int], overrides: dict[str, float],
                 extractors: list[str], ref_model: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.shape = image_shape
        self.overrides = dict(overrides)
        self.extractors = list(extractors)
        self._rates: dict[str, tuple[float, float, float, float]] = {}
        # an override is the rate of ref_model: as a reference rate it is that times its compute
        self._ref = model_compute(ref_model, image_shape) if ref_model else 1.0

    def _rate(self, model: dict[str, Any]) -> tuple[float, float, float, float]:
        """(CPU train, CPU forward, GPU train, GPU forward) img/s of ``model``."""
        key = repr(sorted(model.items()))
        if key not in self._rates:
            compute = model_compute(model, self.shape)
            gpu_ratio = model_compute(GPU_XL2, self.shape) / compute
            train, fwd = (self.overrides.get(k, ref) * (self._ref if k in self.overrides else 1.0)
                          for k, ref in (("train_img_per_s", REF_TRAIN_IMG_PER_S),
                                         ("forward_img_per_s", REF_FORWARD_IMG_PER_S)))  # fmt: skip
            self._rates[key] = (
                train / compute,
                fwd / compute,
                min(GPU_TRAIN_IMG_PER_S * gpu_ratio, GPU_CAP_TRAIN),
                min(GPU_FORWARD_IMG_PER_S * gpu_ratio, GPU_CAP_FORWARD),
            )
        return self._rates[key]

    def train(self, model: dict[str, Any], steps: int, batch: int, *, encode: bool = False) -> Cost:
        """``encode``: the batches go through the study's autoencoder first."""
        cpu, _, gpu, _ = self._rate(model)
        extra = steps * batch / AE_ENCODE_IMG_PER_S if encode else 0.0
        return Cost(steps * batch / cpu + extra + OVERHEAD["train"],
                    steps * batch / gpu + OVERHEAD["train"])  # fmt: skip

    def distill(self, model: dict[str, Any], steps: int, batch: int) -> Cost:
        """Latent consistency distillation of a student of ``model`` (:data:`DISTILL_FACTOR`)."""
        c = self.train(model, steps, batch)
        return Cost(DISTILL_FACTOR * (c.cpu - OVERHEAD["train"]) + OVERHEAD["train"],
                    DISTILL_FACTOR * (c.gpu - OVERHEAD["train"]) + OVERHEAD["train"])  # fmt: skip

    def finetune(self, model: dict[str, Any], steps: int, batch: int, adapter: str) -> Cost:
        """An adapter (``controlnet`` / ``t2i-adapter``) fine-tuned on a frozen base
        ``model`` (:data:`FINETUNE_FACTOR`)."""
        c, f = self.train(model, steps, batch), FINETUNE_FACTOR[adapter]
        return Cost(f * (c.cpu - OVERHEAD["train"]) + OVERHEAD["train"],
                    f * (c.gpu - OVERHEAD["train"]) + OVERHEAD["train"])  # fmt: skip

    def epoch_steps(self, data: dict[str, Any], epochs: float, batch: int) -> int:
        """Steps of ``epochs`` over the training split (as ``finetune_config`` counts them)."""
        import math

        from condnoise.errors import UserError

        src = str(data.get("source", "fashion-mnist"))
        n = data.get("max_samples") or self.overrides.get("train_images") or TRAIN_IMAGES.get(src)
        if not n:
            raise UserError(f"study: finetune.epochs on data.source {src!r}: the plan needs the "
                            "training split's size: give cost.train_images (or data.max_samples)")
        return max(1, math.ceil(epochs * int(n) / batch))

    @staticmethod
    def autoencoder(steps: int, batch: int) -> Cost:
        """The study's first stage (:data:`AE_TRAIN_IMG_PER_S`; rough for other presets)."""
        return Cost(steps * batch / AE_TRAIN_IMG_PER_S + OVERHEAD["train"],
                    steps * batch / AE_GPU_IMG_PER_S + OVERHEAD["train"])  # fmt: skip

    def sample(self, model: dict[str, Any], num: int, steps: int, scale: float,
               sampler: str = "dpm++") -> Cost:  # fmt: skip
        guided = scale not in (0.0, 1.0) and sampler != "lcm"  # lcm: guidance embedding, one pass
        forwards = num * steps * (2 if guided else 1)  # CFG: two halves
        _, cpu, _, gpu = self._rate(model)
        return Cost(forwards / cpu + OVERHEAD["sample"], forwards / gpu + OVERHEAD["sample"])

    def evaluate(self, num: int) -> Cost:
        rate = self.overrides.get("eval_img_per_s")
        if rate:
            cpu = num / rate
        else:
            cpu = sum(num / (INCEPTION_IMG_PER_S if ex == "inception" else FMNIST_CLASSIFIER_IMG_PER_S)
                      for ex in self.extractors)  # fmt: skip
        gpu = num * len(self.extractors) / GPU_EVAL_IMG_PER_S
        return Cost(cpu + OVERHEAD["evaluate"], gpu + OVERHEAD["evaluate"])

    def walk(self, model: dict[str, Any], frames: int, grid_per_class: int, steps: int) -> Cost:
        _, cpu, _, _ = self._rate(model)
        images = 3 * frames + 10 * grid_per_class  # three walks and a 10-class grid
        return Cost(images * steps * 2 / cpu + OVERHEAD["walk"], OVERHEAD["walk"] + 2.0)

    @staticmethod
    def corrupt() -> Cost:
        return Cost(CORRUPT_SECONDS, CORRUPT_SECONDS)

    @staticmethod
    def theory() -> Cost:
        return Cost(THEORY_SECONDS, THEORY_SECONDS)
