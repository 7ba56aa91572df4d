"""Images to scores: folders read as training reads them, the FID network's features of them (inception.py),
a reference folder's features cached outside it (keyed by its files' names, sizes and times), and the numbers
and the copies picture from two feature sets (scores.py). The API's evaluate() (api_eval.py) puts them together."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load, save

from ..errors import DataError
from ..formats.files import atomic_write_bytes, cache_dir
from ..images.cache import stamps
from ..images.data import find_files
from ..images.decode import decode_image, read_image
from . import inception, scores
from .inception import Precision, Resize

Progress = Callable[[int, int], None]
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults
PR_K = 3  # Kynkäänniemi et al. 2019's k
COPIES_SHOWN = 8  # rows of copies.png


@dataclass(frozen=True)
class Scores:
    """What `diffuse eval` reports; as_json() is its --json object."""

    fid: float
    kid_mean: float
    kid_std: float
    kid_subset: int
    precision: float
    recall: float
    copies: int
    n_samples: int
    n_reference: int
    resize: str

    def as_json(self) -> dict:
        return {"fid": self.fid, "kid": {"mean": self.kid_mean, "std": self.kid_std}, "precision": self.precision,
                "recall": self.recall, "copies": {"count": self.copies, "of": self.n_samples},
                "n_samples": self.n_samples, "n_reference": self.n_reference, "resize": self.resize}


def image_files(folder: Path, role: str) -> list[Path]:
    """A folder's images (searched recursively, as train finds them); fewer than 2 is refused."""
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file; give a folder of images as the {role}")
    files = find_files(folder)
    if len(files) < 2:
        raise DataError(f"{folder}: {len(files)} image{'s' * (len(files) != 1)}; the {role} needs at least 2")
    return files


def read_images(files: list[Path], size: int | None = None) -> list[torch.Tensor]:
    """Each file as uint8 (3, H, W), at its own size (None) or resized and centre-cropped to `size` as train
    does; grayscale as three equal channels. A file that cannot be read is refused by name."""
    images = []
    for f in files:
        try:
            images.append(read_image(f, 3) if size is None else decode_image(f, size, 3))
        except Exception as e:  # any decoder failure is the user's file, not our bug
            raise DataError(f"{f}: cannot read as an image ({str(e).splitlines()[0] or type(e).__name__})") from None
    return images


def image_features(images: list[torch.Tensor] | torch.Tensor, resize: Resize, device: torch.device | str = "cpu",
                   batch_size: int = 50, progress: Progress | None = None, precision: Precision = "fp32"
                   ) -> torch.Tensor:
    """FID-network features of images of any sizes (each batch is of one size), in order: (N, 2048)."""
    out, done = [], 0
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    order = [i for indices in groups.values() for i in indices]
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            part = torch.stack([images[i] for i in indices[start:start + batch_size]])
            out.append(inception.features(part, resize, device, batch_size, precision))
            done += len(part)
            if progress:
                progress(done, len(images))
    feats = torch.cat(out)
    return feats[torch.argsort(torch.tensor(order))]


def folder_key(folder: Path, files: list[Path], resize: str, precision: str = "fp32") -> str:
    """What a folder's cached features depend on: where it is, each file's name, size and time (as the image
    cache checks them: images/cache.stamps), the resize, the network."""
    h = hashlib.sha256(f"{folder.resolve()}\n{resize}\n{precision}\n{inception.SHA256}\n".encode(
        "utf-8", "surrogateescape"))
    h.update(json.dumps(stamps(folder, files)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def reference_features(folder: Path, resize: Resize, device: torch.device | str = "cpu",
                       progress: Progress | None = None, cache: Path | None = None, precision: Precision = "fp32"
                       ) -> tuple[torch.Tensor, bool]:
    """A reference folder's features, from the cache when its files are unchanged (else computed and cached);
    (features, whether they came from the cache)."""
    files = image_files(folder, "reference")
    path = (cache or cache_dir()) / "eval" / f"{folder_key(folder, files, resize, precision)}.safetensors"
    if path.is_file():
        try:
            return load(path.read_bytes())["features"], True
        except Exception:  # a cache file that cannot be read is computed again, never trusted
            pass
    feats = image_features(read_images(files), resize, device, progress=progress, precision=precision)
    meta = {"folder": str(folder.resolve()), "images": str(len(files)), "resize": resize, "precision": precision}
    atomic_write_bytes(path, save({"features": feats.contiguous()}, metadata=meta))
    return feats, False


def tensor_features(images: torch.Tensor, resize: Resize, device: torch.device | str = "cpu",
                    progress: Progress | None = None, cache: Path | None = None, precision: Precision = "fp32"
                    ) -> tuple[torch.Tensor, bool]:
    """Features of uint8 images held in memory (the built-in shapes), cached by a hash of their pixels."""
    salt = f"{resize}{precision}{inception.SHA256}".encode()
    key = hashlib.sha256(images.contiguous().numpy().tobytes() + salt).hexdigest()
    path = (cache or cache_dir()) / "eval" / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            return load(path.read_bytes())["features"], True
        except Exception:
            pass
    feats = image_features(list(images), resize, device, progress=progress, precision=precision)
    atomic_write_bytes(path, save({"features": feats.contiguous()}, metadata={"images": str(len(images))}))
    return feats, False


def score(samples: torch.Tensor, reference: torch.Tensor, resize: str, sample_pixels: torch.Tensor | None = None,
          reference_pixels: torch.Tensor | None = None, seed: int = 0) -> tuple[Scores, scores.Copies | None]:
    """The numbers from two feature sets (N, 2048); copies from the pixels, when given (one size, uint8)."""
    mu1, s1 = scores.mean_cov(samples)
    mu2, s2 = scores.mean_cov(reference)
    kid, kid_std, subset = scores.kernel_distance(samples, reference, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    precision, recall = scores.precision_recall(reference, samples, PR_K)
    copied = None if sample_pixels is None else scores.copies(sample_pixels, reference_pixels)
    return Scores(scores.frechet_distance(mu1, s1, mu2, s2), kid, kid_std, subset, precision, recall,
                  0 if copied is None else int(copied.copied.sum()), len(samples), len(reference), resize), copied


def copies_picture(samples: torch.Tensor, reference: torch.Tensor, copied: scores.Copies,
                   rows: int = COPIES_SHOWN) -> torch.Tensor:
    """The closest pairs, closest first: each row a sample beside its nearest reference image; uint8 (C, H, W)."""
    from ..images.pictures import make_grid

    closest = torch.argsort(copied.distance)[:rows]
    pairs = torch.stack([t for i in closest.tolist() for t in (samples[i], reference[int(copied.nearest[i])])])
    return make_grid(pairs, nrow=2)


# The built-in shapes' reference: the first images of their training set (all 8,192 would take a CPU a quarter of
# an hour to score the first time, and as long again to sample as many).
BUILTIN_REFERENCE = 2000
COPY_SIZE = 32  # copies are judged in pixels at most this size, as Carlini et al. did on CIFAR-10


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized (area) to size, for the pixel comparison of copies."""
    if images.shape[-1] == size:
        return images
    import torch.nn.functional as F

    return F.interpolate(images.float(), size=(size, size), mode="area").round().to(torch.uint8)
