"""Images in: folders and the built-in dataset, decoded as training reads them, and [0, 255] <-> [-1, 1].

Every image is decoded once (decode.py), resized (short side) and centre-cropped, into the image cache
(cache.py), which training maps and reads a batch ahead, so that it never waits on a JPEG decoder. Without the
cache the set is kept in memory as uint8, or where it would not fit, decoded on demand, each batch during the
step before (ReadAhead).
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..network.device import memory_available
from ..errors import DataError, Note
from ..formats.files import MODEL_FILE, STATE_FILE
from .cache import Entry, build_entry, entry_path, read_entry, stamps
from .decode import _try_decode, is_grayscale
from .shapes import SHAPES, render_shapes, shape_kinds


class Share(Protocol):
    """The processes of a DDP run as reading a folder needs them (training.distributed.Share is one): each decodes
    its share of the files, and they agree and swap what they found."""

    rank: int
    size: int

    def all(self, flag: bool) -> bool: ...
    def same(self, value: int) -> bool: ...
    def sum_(self, t: torch.Tensor) -> None: ...

BUILTIN = "builtin:shapes"
BUILTIN_SIZE = 8192
# Below this many training images a diffusion model soon reproduces them: a note says so at start.
FEW_IMAGES = 1000
# A class with fewer images than this, or than a tenth of the classes' mean, gets a warning.
FEW_PER_CLASS = 20


@dataclass
class ImageData:
    """Training images as uint8 (N, C, H, W), or paths decoded on demand when too large."""

    source: str
    image_size: int
    channels: int
    images: torch.Tensor | None = None
    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    upscaled: list[int] = field(default_factory=list)  # short sides of the images smaller than image_size
    classes: tuple[str, ...] = ()  # class names: the data folder's first-level subfolders (two or more)
    labels: torch.Tensor | None = None  # (N,) int64 class index of each image; -1: none (directly in the folder)
    mapped: bool = False  # images is a file mapped from the cache (cache.py): pages are read as batches touch them
    cache_note: str | None = None  # where the images came from, or why they are not cached
    left_out: list[str] = field(default_factory=list)  # what diffuse wrote in the folder (find_files), relative to it

    @classmethod
    def from_tensor(cls, images: torch.Tensor, labels: torch.Tensor | None = None, classes: tuple[str, ...] = (),
                    source: str = "tensor") -> "ImageData":
        """Training images from memory: uint8 in [0, 255] or float in [-1, 1], (N, C, H, W) with C 1 or 3 and
        H = W, and optionally their class indices (N,) (-1: none) with the class names; what a notebook
        passes to `diffuse_cli.train`."""
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
            raise DataError(f"images must be (N, C, H, W) with C 1 or 3 and H = W, not {tuple(images.shape)}")
        if not len(images):
            raise DataError("no images: the tensor is empty")
        if images.dtype != torch.uint8:
            images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).cpu()
            if labels.shape != (len(images),) or not classes or labels.min() < -1 or labels.max() >= len(classes):
                raise DataError(f"labels must be one class index (or -1) per image, below the {len(classes)} "
                                "class names given")
        return cls(source, images.shape[-1], images.shape[1], images=images.cpu().contiguous(), classes=tuple(classes),
                   labels=labels)

    def class_counts(self) -> dict[str, int]:
        """Images per class, by name."""
        counts = torch.bincount(self.labels[self.labels >= 0], minlength=len(self.classes)).tolist() if self.classes else []
        return dict(zip(self.classes, counts))

    def without_classes(self) -> "ImageData":
        return replace(self, classes=(), labels=None)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def notes(self, from_folder: bool) -> list[str]:
        """The warnings and notes this data set calls for, each a line starting 'warning:' or 'note:'."""
        n, skipped, upscaled, notes = len(self), self.skipped, self.upscaled, []
        if skipped:
            listed = ", ".join(f"{Path(p).name} ({why})" for p, why in skipped[:8])
            more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
            notes.append(f"warning: skipped {len(skipped)} of {n + len(skipped)} files: {listed}{more}")
        if upscaled:
            one = len(upscaled) == 1
            smallest, (verb, pronoun, possessive) = min(upscaled), ("is", "it", "its") if one else ("are", "them", "their")
            notes.append(Note(f"warning: {len(upscaled)} of {n} images {verb} smaller than {{image_size}} "
                              f"{self.image_size} (the smallest is {smallest} pixel{'s' * (smallest != 1)} on its "
                              f"short side) and {verb} enlarged, which blurs {pronoun}; a smaller {{image_size}} "
                              f"keeps {possessive} detail", "image_size"))
        if from_folder and n < FEW_IMAGES:
            notes.append(f"note: {n} image{'s' * (n != 1)} is few for a diffusion model (thousands are "
                         "usual); as training goes on its samples will copy them more and more closely")
        if self.left_out:
            more = len(self.left_out) - 4
            listed = ", ".join(self.left_out[:4]) + (f" and {more} more" if more > 0 else "")
            notes.append(f"note: left out what diffuse wrote there (runs, grids of samples), not training images: "
                         f"{listed}")
        if self.cache_note:
            notes.append(self.cache_note)
        if self.images is None:
            notes.append("note: the decoded images do not fit in memory; decoding on demand (slower)")
        counts = self.class_counts()
        for name, count in counts.items():
            if count < max(FEW_PER_CLASS, 0.1 * len(self) / len(counts)):
                notes.append(f"warning: class {name!r} has only {count} image{'s' * (count != 1)}; its samples will "
                             "be poor, or copies of them")
        return notes

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images at these indices, (B, C, H, W); from disk on decoder threads when not in memory.

        Gathered by numpy, not by a torch operator: this runs on the read-ahead thread, where a torch operator
        starts an OpenMP team of that thread's own, whose idle threads then spin on the cores the training step
        is using (docs/speed.md measures what that cost)."""
        if self.images is not None:
            return torch.from_numpy(self.images.numpy()[indices.numpy()])
        return torch.from_numpy(np.stack([image.numpy() for image in
                                          _decoder_threads().map(self._decode_again, indices.tolist())]))

    def _decode_again(self, i: int) -> torch.Tensor:
        result = _try_decode(self.paths[i], self.image_size, self.channels)
        if isinstance(result, str):
            raise DataError(f"{self.paths[i]}: {result}; it decoded when training started, was it changed since?")
        return result[0]


class ReadAhead:
    """Batches of images decoded on demand, each started on a background thread one step before
    it is needed, so that decoding overlaps the training step; keys name the batches."""

    def __init__(self, data: ImageData):
        self.data = data
        self.pending: dict[object, Future] = {}
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")

    def fetch(self, key: object, indices: torch.Tensor) -> None:
        self.pending[key] = self.thread.submit(self.data.batch, indices)

    def get(self, key: object, indices: torch.Tensor) -> torch.Tensor:
        future = self.pending.pop(key, None)
        return future.result() if future is not None else self.data.batch(indices)


@functools.cache
def _decoder_threads() -> ThreadPoolExecutor:
    """Threads for decoding (PIL releases the GIL while it decodes), shared by every caller."""
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="decode")


# -- pixels <-> model space, in one place -----------------------------------------------------
# What diffuse writes beside the images it draws: pictures of them, not more of them.
SAMPLE_PICTURES = ("grid.png", "strip.png", "strip.gif", "trajectory.png", "trajectory.gif")
RUN_FILES = (MODEL_FILE, STATE_FILE)  # a folder holding one is a run's or a model's, whose PNGs are its grids


def find_files(root: Path, left_out: list[Path] | None = None) -> list[Path]:
    """Every non-hidden file below root, sorted; follows symlinks but never loops. What diffuse wrote is not taken
    for images (each such path appended to `left_out`, when given): below root, a run folder and a folder of
    samples or frames, whole; in root itself, when it is such a folder of samples, its grid and strips (its numbered
    NNNN.png are the samples). With the default places, `cd photos; diffuse train .` would otherwise train a second
    run on the first one's grids and take checkpoints/ and samples/ for classes, and `diffuse eval` of a folder of
    samples would score its grid.png as one more sample."""
    seen: set[str] = set()
    found: list[Path] = []
    left_out = [] if left_out is None else left_out
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        files = [f for f in files if not f.startswith(".")]
        ours = [f for f in files if f in SAMPLE_PICTURES] if any(f.startswith("0000") for f in files) else []
        if Path(folder) != root and (ours or any(f in files for f in RUN_FILES)):
            dirs[:] = []
            left_out.append(Path(folder))
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        left_out += [Path(folder) / f for f in sorted(ours)]
        found += [Path(folder) / f for f in files if f not in ours]
    return sorted(found)


def _decode_all(files: list[Path], size: int, channels: int, window: int = 4096):
    """(path, _try_decode's result) for every file in order, decoded on the decoder threads a
    window at a time, so that a folder of millions of files never queues millions of tasks."""
    for start in range(0, len(files), window):
        some = files[start:start + window]
        yield from zip(some, _decoder_threads().map(lambda path: _try_decode(path, size, channels), some))


def load_folder(root: str | os.PathLike, size: int, channels: int | None = 3,
                progress: Callable[[int, int], None] | None = None, copies: int = 1,
                share: Share | None = None, cache: str | os.PathLike | bool = True) -> ImageData:
    """Decode every image below root once; unusable files are listed in `skipped`.

    channels=None picks them from the images: 1 when every one is grayscale (whatever its file
    mode: L, palette or RGB with equal channels), else 3. cache: keep the decoded images in the cache
    folder (True: cache.py's default place; a path: there; False: never), from which a later run reads them
    without decoding. Without it, the images are decoded into memory, or where they would not fit, checked
    now and decoded again whenever a batch needs them. `copies`: how many processes on this machine load the
    same set (DDP), so that all of them together fit in memory. `share`: the processes of a DDP run, each of
    which decodes every share.size-th file; they then swap what they found, so that each ends with the whole
    set, decoded once (a DDP run does not use the cache)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    left_out: list[Path] = []
    files = [root] if root.is_file() else find_files(root, left_out)
    if share and not share.same(_fingerprint(root, files)):  # else their shares would not fit together
        raise DataError(f"{root}: the processes of this run see different files there; every machine must see "
                        "the same folder")
    decode_as = channels or 3
    why_not = None
    if cache is not False and share is None and root.is_dir() and files:
        where = entry_path(root, size, decode_as, None if cache is True else Path(cache))
        now = stamps(root, files)
        entry = read_entry(where, now, size, decode_as) or build_entry(
            where, root, files, now, size, decode_as, (r for _, r in _decode_all(files, size, decode_as)), progress)
        if isinstance(entry, Entry):
            data = _image_data(root, files, size, channels, entry.kept, entry.reasons, entry.short_side,
                               entry.grayscale, left_out)
            data.images, data.mapped, data.cache_note = entry.images[:, :data.channels], True, entry.note
            return data
        why_not = f"note: the decoded images are not cached: {entry}"
    rank, count = (share.rank, share.size) if share else (0, 1)
    # Decode straight into one buffer when the set fits in half the available memory, else only
    # check each file now and decode it again whenever a batch needs it: never a list of every image.
    in_memory = len(files) * decode_as * size * size * copies < memory_available() // 2
    in_memory = share.all(in_memory) if share else in_memory
    images = (torch.zeros if share else torch.empty)((len(files) if in_memory else 0, decode_as, size, size),
                                                     dtype=torch.uint8)  # zeros: summed over processes
    decoded = torch.zeros(len(files), dtype=torch.uint8)  # per file: 1 if it decoded
    grayscale = torch.zeros(len(files), dtype=torch.uint8)  # 1 if it is grayscale (when asked)
    short_side = torch.zeros(len(files), dtype=torch.int32)
    reasons: dict[int, str] = {}  # file index -> why it was skipped
    mine = files[rank::count]
    for k, (path, result) in enumerate(_decode_all(mine, size, decode_as)):
        i = rank + k * count
        if isinstance(result, str):
            reasons[i] = result
        else:
            image, short_side[i] = result
            decoded[i] = 1
            grayscale[i] = channels is None and is_grayscale(image)
            if in_memory:
                images[i] = image
        if progress:
            progress(k + 1, len(mine))
    if share:
        for t in (images, decoded, grayscale, short_side):
            share.sum_(t)
        reasons = share.merge(reasons)
    kept = decoded.nonzero()[:, 0]
    data = _image_data(root, files, size, channels, kept.tolist(), reasons, short_side[kept].tolist(),
                       grayscale[kept].bool().tolist(), left_out)
    data.cache_note = why_not
    if in_memory:
        _close_gaps(images, kept)
        data.images = images[:len(kept), :data.channels].contiguous()  # a view unless grayscale was found
    return data


def _image_data(root: Path, files: list[Path], size: int, channels: int | None, kept: list[int],
                reasons: dict[int, str], short_side: list[int], grayscale: list[bool],
                left_out: list[Path]) -> ImageData:
    """The folder's ImageData, its images still to be attached: the files kept, those skipped and why, the
    channels (None: 1 when every kept image is grayscale), the images enlarged, the classes, and what
    diffuse wrote there (find_files's `left_out`)."""
    skipped = [(str(files[i]), reasons[i]) for i in sorted(reasons)]
    if not kept:
        what = "no files"
        if files:
            first, why = skipped[0]
            what = (f"{len(files)} file{'s' * (len(files) > 1)}, none of them a readable image "
                    f"({Path(first).name}: {why})")
        raise DataError(f"{root}: {what}; expected png, jpg, webp, bmp, gif or tiff images")
    if channels is None:
        channels = 1 if all(grayscale) else 3
    paths = [files[i] for i in kept]
    classes, labels = folder_classes(root, paths)
    return ImageData(str(root.resolve()), size, channels, paths=paths, skipped=skipped,
                     upscaled=[s for s in short_side if s < size], classes=classes, labels=labels,
                     left_out=[str(p.relative_to(root)) for p in left_out])


def folder_classes(root: Path, paths: list[Path]) -> tuple[tuple[str, ...], torch.Tensor | None]:
    """(class names, each image's class index or -1) when the images sit in two or more first-level
    subfolders of root, which name their classes; images directly in root have no class."""
    firsts = [p.relative_to(root).parts[0] if p != root and len(p.relative_to(root).parts) > 1 else None
              for p in paths]
    classes = tuple(sorted({f for f in firsts if f is not None}))
    if len(classes) < 2:
        return (), None
    index = {name: i for i, name in enumerate(classes)}
    return classes, torch.tensor([index.get(f, -1) if f is not None else -1 for f in firsts], dtype=torch.long)


def _fingerprint(root: Path, files: list[Path]) -> int:
    """A 56-bit digest of the file names below root, the same on every machine that mounts it anywhere."""
    names = "\n".join(str(f.relative_to(root)) if f != root else f.name for f in files)
    return int.from_bytes(hashlib.sha256(names.encode("utf-8", "surrogateescape")).digest()[:7], "little")


def _close_gaps(images: torch.Tensor, kept: torch.Tensor, chunk: int = 4096) -> None:
    """Move images[kept] to the front of images, in place and in order, a chunk at a time.
    Safe because kept rises and kept[i] >= i: a chunk's sources lie at or after its destinations,
    each chunk is gathered before it is written, and later chunks read only from further on."""
    for start in range(0, len(kept), chunk):
        sources = kept[start:start + chunk]
        if sources[-1] != start + len(sources) - 1:  # else already in place
            images[start:start + len(sources)] = images[sources]


def load_builtin(size: int, channels: int | None = 3, n: int = BUILTIN_SIZE) -> ImageData:
    """The built-in shapes dataset at this size (in colour unless channels=1)."""
    channels = channels or 3
    images, kinds = render_shapes(n, size, seed=0), shape_kinds(n, seed=0)
    if channels == 1:
        images = (images.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        images = images.round().to(torch.uint8)
    return ImageData(BUILTIN, size, channels, images=images, classes=SHAPES, labels=kinds)


def load_data(source: str | None, size: int, channels: int | None = 3,
              progress: Callable[[int, int], None] | None = None, copies: int = 1,
              share: Share | None = None, cache: str | os.PathLike | bool = True) -> ImageData:
    """A folder path, or None / 'builtin:shapes' for the built-in dataset; channels=None: from the images."""
    if source in (None, BUILTIN):
        return load_builtin(size, channels)
    return load_folder(source, size, channels, progress, copies, share, cache)
