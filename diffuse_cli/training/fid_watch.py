"""`train --eval-every N`: FID during training, of `eval_n` samples from the EMA weights (or, with --eval-ema, from
post-hoc EMAs of the lengths asked) against as many of the training images (evaluation/), so that a run can say when
it got better and keep its best weights."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import Config
from ..diffusion.denoiser import SampleHooks, generate
from ..evaluation import scores
from ..evaluation.features import image_features, tensor_features
from ..images.data import ImageData


class FidWatch:
    """FID of eval_n samples (the default sampler, a seed of their own) against eval_n training images, evenly
    spaced through the data set; the reference's features are computed once and cached on disk."""

    def __init__(self, data: ImageData, eval_n: int, device: torch.device, lengths: tuple[float, ...] = ()):
        self.data, self.device = data, device
        self.lengths = lengths  # post-hoc EMA lengths to score instead of the run's EMA (RunFolder.evaluate)
        self.n = min(eval_n, len(data))
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.best: float | None = None

    def reference_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            picks = torch.linspace(0, len(self.data) - 1, self.n).round().long()
            feats, _ = tensor_features(self.data.batch(picks), "tf", self.device)
            self.reference = scores.mean_cov(feats)
        return self.reference

    def __call__(self, ema: torch.nn.Module, config: Config, precision: str,
                 log: Callable[[str], None] = lambda message: None,
                 progress: Callable[[float, int], None] | None = None) -> tuple[float, bool]:
        """(the FID of the EMA weights now, whether it is the best so far); `progress` hears of each network call."""
        reference = self.reference_stats()
        was_training = ema.training
        ema.eval()
        try:
            images, _ = generate(ema, config, self.n, hooks=SampleHooks(progress=progress, log=log),
                                 seed=config.train.seed + 1_000_003, precision=precision)
        finally:
            ema.train(was_training)
        fid = scores.frechet_distance(*scores.mean_cov(image_features(list(images), "tf", self.device)), *reference)
        improved = self.best is None or fid < self.best
        self.best = fid if improved else self.best
        return fid, improved
