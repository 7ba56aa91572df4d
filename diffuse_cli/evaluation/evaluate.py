"""`diffuse eval` as a function: two sets of images (folders, tensors, or a run to sample from first) scored by
FID, KID, precision/recall and copies (scores.py) on the FID network's features (inception.py); a reference
folder's features are cached outside it, keyed by its files' names, sizes and times."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load, save

from ..errors import DataError, UsageError
from ..formats.files import atomic_write_bytes
from ..images.data import decode_image, find_files, read_image
from . import inception, scores
from .inception import Precision, Resize

Progress = Callable[[int, int], None]
CACHE_ENV = "DIFFUSE_CACHE"  # where reference statistics are kept (default: ~/.cache/diffuse)
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


def cache_dir() -> Path:
    """$DIFFUSE_CACHE, else $XDG_CACHE_HOME/diffuse, else ~/.cache/diffuse."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffuse"


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


def folder_key(files: list[Path], resize: str, precision: str = "fp32") -> str:
    """What a folder's cached features depend on: each file's path, size and time, the resize, the network."""
    h = hashlib.sha256(f"{resize}\n{precision}\n{inception.SHA256}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def reference_features(folder: Path, resize: Resize, device: torch.device | str = "cpu",
                       progress: Progress | None = None, cache: Path | None = None, precision: Precision = "fp32"
                       ) -> tuple[torch.Tensor, bool]:
    """A reference folder's features, from the cache when its files are unchanged (else computed and cached);
    (features, whether they came from the cache)."""
    files = image_files(folder, "reference")
    path = (cache or cache_dir()) / "eval" / f"{folder_key(files, resize, precision)}.safetensors"
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


def write_json(scores_: Scores) -> str:
    return json.dumps(scores_.as_json())


# The built-in shapes' reference: the first images of their training set (all 8,192 would take a CPU a quarter of
# an hour to score the first time, and as long again to sample as many).
BUILTIN_REFERENCE = 2000
COPY_SIZE = 32  # copies are judged in pixels at most this size, as Carlini et al. did on CIFAR-10


@dataclass
class Evaluation:
    """What evaluate() found: the scores, the closest pairs as a picture, where the samples are, and notes."""

    scores: Scores
    copies_png: torch.Tensor  # uint8 (C, H, W): the closest pairs, sample beside reference image, closest first
    samples: Path | None  # the folder scored (or sampled into; None: a temporary folder, gone)
    reference: str  # the reference, in words
    cached: bool  # whether the reference's features came from the cache
    notes: list[str]


def evaluate(samples, reference=None, *, n: int | None = None, out=None, resize: Resize = "tf",
             precision: Precision = "fp32", device: str = "auto", cache=None, seed: int = 0,
             progress: Callable[[str, float, int], None] | None = None,
             log: Callable[[str], None] = lambda message: None) -> Evaluation:
    """Score `samples` against `reference`: FID, KID, precision/recall and copies (scores.py).

    samples: a folder of images, or a run (a run folder, a model.safetensors, or a Model) to draw n samples from
    first with its default sampler (n: the reference's size, at most 10,000) into `out` (None: a temporary
    folder). reference: a folder of images (default for a run: its training folder, or the built-in shapes it
    trained on). progress(stage, done, total) reports each stage: "sampling", "samples", "reference"."""
    import tempfile

    from ..formats.files import MODEL_FILE
    from ..model import Model

    if resize not in ("tf", "pytorch", "clean"):
        raise UsageError(f"unknown {{resize}} {resize!r}; choose one of: tf, pytorch, clean", "resize")
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"unknown {{precision}} {precision!r}; choose fp32 or bf16", "precision")
    if n is not None and n < 2:
        raise UsageError(f"{{n}} must be at least 2, not {n}", "n")
    stage = (lambda name: (lambda done, total: progress(name, done, total))) if progress else (lambda name: None)
    model = samples if isinstance(samples, Model) else None
    path = None if model is not None else Path(samples)
    if path is not None and not path.exists():
        raise DataError(f"{path}: no such folder or checkpoint")
    if path is not None and (path.suffix == ".safetensors" or (path / MODEL_FILE).exists()):
        from ..api import load

        model = load(path, device)
    if model is None and n is not None:
        raise UsageError("{n} applies to a run, which draws that many samples to score; a folder is scored whole", "n")
    sample_files = image_files(path, "samples") if model is None else None
    ref_images, ref_folder, ref_words = _reference(model, reference)
    ref_files = None if ref_folder is None else image_files(ref_folder, "reference")
    if out is not None and model is not None and any(Path(out).glob("*.png")):
        raise UsageError(f"{{out}} {out} already holds images; name a new folder for the samples", "out")
    inception.network_file()  # the extra missing is said before any work
    notes: list[str] = []
    run_device = inception_device(device)
    with tempfile.TemporaryDirectory(prefix="diffuse-eval-") as scratch:
        if model is not None:
            from ..images.sample_run import SampleRun

            count = n or min(10_000, len(ref_files) if ref_files is not None else len(ref_images))
            folder = Path(out) if out is not None else Path(scratch) / "samples"
            run = SampleRun(model, count, folder=folder)
            run.run(progress=stage("sampling"), log=log)
            sample_files = sorted(f for f in folder.glob("*.png") if f.stem.split("-")[0].isdigit())  # not grid.png
        sample_feats = image_features(read_images(sample_files), resize, run_device, progress=stage("samples"),
                                      precision=precision)
        if ref_folder is not None:
            ref_feats, cached = reference_features(ref_folder, resize, run_device, stage("reference"),
                                                   None if cache is None else Path(cache), precision)
        else:
            ref_feats, cached = tensor_features(ref_images, resize, run_device, stage("reference"),
                                                None if cache is None else Path(cache), precision)
        size = min(COPY_SIZE, min(read_images(sample_files[:1])[0].shape[1:]))
        sample_px = torch.stack(read_images(sample_files, size))
        ref_px = torch.stack(read_images(ref_files, size)) if ref_files is not None else _resized(ref_images, size)
        result, copied = score(sample_feats, ref_feats, resize, sample_px, ref_px, seed)
        if result.kid_subset < KID_SUBSET_SIZE:
            notes.append(f"KID over subsets of {result.kid_subset} (the smaller set's size), not {KID_SUBSET_SIZE}: "
                         "compare it only with KIDs on subsets of the same size")
        picture = copies_picture(sample_px, ref_px, copied)
        kept = None if model is not None and out is None else (folder if model is not None else path)
    return Evaluation(result, picture, kept, ref_words, cached, notes)


def inception_device(device: str) -> torch.device:
    from ..network.device import pick_device

    return pick_device(device)


def _reference(model, reference) -> tuple[torch.Tensor | None, Path | None, str]:
    """(images held in memory, or None; the reference folder, or None; the reference in words): the folder given,
    else the run's training folder, or the built-in shapes it trained on."""
    if reference is not None:
        return None, Path(reference), str(reference)
    if model is None:
        raise UsageError("name the reference: diffuse eval SAMPLES REFERENCE (two folders of images)")
    from ..formats.files import STATE_FILE
    from ..images.data import BUILTIN, load_builtin
    from ..training.runs import data_of_run

    run = None if model.path is None else model.path.parent
    folder = data_of_run(run) if run is not None and (run / STATE_FILE).exists() else None
    if folder is None and model.info.get("data") != BUILTIN:
        raise UsageError(f"{model.path} does not say what it trained on (no training state beside it); name the "
                         "reference folder: diffuse eval RUN REFERENCE")
    if folder is None:
        size = model.config.model.image_size
        images = load_builtin(size, 3).images[:BUILTIN_REFERENCE]
        return images, None, f"the first {BUILTIN_REFERENCE:,} built-in shapes at {size}x{size}"
    return None, Path(folder), folder


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized (area) to size, for the pixel comparison of copies."""
    if images.shape[-1] == size:
        return images
    import torch.nn.functional as F

    return F.interpolate(images.float(), size=(size, size), mode="area").round().to(torch.uint8)
