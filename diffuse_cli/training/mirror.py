"""Does a mirrored image look like the data? A probe that tries to tell images from their mirror images.

Mirroring left-right (Ho et al.'s augmentation) doubles a data set of photographs for free, but on
digits, letters, text, logos or anything else with a handedness a mirrored image is not a fair
example: the model learns to draw mirror-writing. If the data has a handedness, a small network
can learn which of an image and its mirror image is the original; if it does not (the data's
distribution is its own mirror image), nothing can, and held-out accuracy stays at chance.

The probe scores an image s(x) and is trained on d(x) = s(x) - s(mirror x) > 0 (a logistic loss
on pairs), so that d(mirror x) = -d(x) exactly: a data set that is its own mirror image gives it
nothing to learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..images.data import ImageData

# Not mirroring is decided when the probe picks the original over its mirror image on at least
# this share of held-out images, and that share is Z_MIN standard errors above chance (so a small
# data set, whose share is noise, is mirrored as it always was).
# Characters top out near 80%, since many are symmetric themselves (A, H, O, 8, ...).
ACCURACY_MIN, Z_MIN = 0.62, 4.0
MAX_IMAGES = 4096  # a random sample of this many, three quarters to train the probe, the rest to test it
PROBE_SIZE = 32  # images are shrunk (area) to at most this side, in grayscale
SHIFT = 2  # each training batch is moved by up to this many pixels each way: the probe learns shapes, not places


@dataclass(frozen=True)
class MirrorVerdict:
    """Whether to mirror training images, and the evidence: the probe's held-out accuracy on `tested` images."""

    mirror: bool
    accuracy: float
    tested: int
    known: str = ""  # why no probe was needed, where none was

    def reason(self) -> str:
        if self.known:
            return self.known
        told = f"a probe told held-out images from their mirror images {self.accuracy:.0%} of the time"
        if self.tested == 0:
            return "too few images to probe for a handedness, so mirrored as usual"
        return told + (" (chance is 50%)" if self.mirror else "")


class _Probe(nn.Module):
    """A small CNN scoring one grayscale image; its layout matters, so no global pooling."""

    def __init__(self, size: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
        side = -(-size // 4)
        self.score = nn.Linear(32 * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x).flatten(1))[:, 0]


def _prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float grayscale (N, 1, s, s) in [-1, 1], s = min(H, PROBE_SIZE), each image
    centred on its own mean so that the probe sees shapes, not brightness."""
    x = images.float().mean(1, keepdim=True) / 127.5 - 1
    side = min(images.shape[-1], PROBE_SIZE)
    if side != images.shape[-1]:
        x = F.interpolate(x, size=(side, side), mode="area")
    return x - x.mean((1, 2, 3), keepdim=True)


def probe_mirroring(images: torch.Tensor, seed: int = 0, steps: int = 400, batch: int = 32) -> MirrorVerdict:
    """Train the probe on a seeded sample of `images` (uint8, (N, C, H, W)) and judge it on held-out ones."""
    n = min(len(images), MAX_IMAGES)
    n_test = n // 4
    if n_test < Z_MIN**2:  # even a perfect probe could not be told from luck: mirror, as before
        return MirrorVerdict(True, 0.5, 0)
    g = torch.Generator().manual_seed(seed)
    x = _prepare(images[torch.randperm(len(images), generator=g)[:n]])
    train, test = x[n_test:], x[:n_test]
    with torch.random.fork_rng(devices=[]):  # the probe's own randomness leaves the caller's untouched
        torch.manual_seed(seed)
        probe = _Probe(x.shape[-1])
        optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
        for _ in range(steps):
            rows = train[torch.randint(len(train), (min(batch, len(train)),), generator=g)]
            rows = rows.roll(tuple(torch.randint(-SHIFT, SHIFT + 1, (2,), generator=g).tolist()), (-2, -1))
            loss = F.softplus(probe(rows.flip(-1)) - probe(rows)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            d = torch.cat([probe(part) - probe(part.flip(-1)) for part in test.split(512)])
    accuracy = ((d > 0).float().mean() + 0.5 * (d == 0).float().mean()).item()  # a tie is a coin toss
    z = (accuracy - 0.5) / (0.5 / math.sqrt(len(test)))
    return MirrorVerdict(not (accuracy >= ACCURACY_MIN and z >= Z_MIN), accuracy, len(test))


def known_verdict(data: ImageData) -> MirrorVerdict | None:
    """The verdict on a data set whose handedness is known without a probe: the built-in shapes are drawn upright,
    centred and symmetric (images/shapes.py), so they are their own mirror images. None for any other data."""
    from ..images.data import BUILTIN

    if data.source == BUILTIN:
        return MirrorVerdict(True, 0.5, 0, known="the built-in shapes are drawn mirror-symmetric")
    return None


def probe_data(data: ImageData, seed: int = 0) -> MirrorVerdict:
    """probe_mirroring on a seeded sample of a data set, decoded from disk if it is not in memory."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:MAX_IMAGES].sort().values
    return probe_mirroring(data.images[pick] if data.images is not None else data.batch(pick), seed)
