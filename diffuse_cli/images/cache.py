"""A folder's images decoded once, kept on disk as one memory-mapped file of uint8 images.

Decoding is the slow part of reading photos (a 256-px crop of a 12-megapixel JPEG takes ~20 ms), and 50,000 of
them at 256 px decoded are 9.8 GB: more than fits in memory beside a run. So each image is decoded, resized and
cropped once, into a file that training maps and indexes as one (N, C, S, S) tensor; the system's page cache keeps
in memory what fits and reads the rest from disk, a batch ahead (data.ReadAhead).

    <cache>/data/<key>.u8     the images in order, N x C x S x S bytes
    <cache>/data/<key>.json   what they are: every file's name, size and time when read, the files skipped and
                              why, each image's short side and whether it is grayscale. Written last: an entry
                              without it is not an entry.

The key is the folder's path, the size and the channels decoded; an entry is used only when every file's name,
size and modification time are as recorded, and is built again otherwise, never read stale. The cache is where
$DIFFUSE_CACHE says (else ~/.cache/diffuse); where it cannot be written, training decodes as it did before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DiskFull
from ..formats.files import SPACE_ERRORS, atomic_write_bytes, cache_dir
from .decode import is_grayscale

FORMAT = 1  # the entry's layout; an entry of another is built again
# Room left on the cache's disk after an entry: a cache never fills the disk a run saves its checkpoints to.
SPARE_BYTES = 1 << 30


@dataclass
class Entry:
    """A folder's images as decoded, and what the folder held when they were."""

    images: torch.Tensor  # (kept, C, S, S) uint8, mapped from the file
    kept: list[int]  # the index in the folder's file list of each image
    reasons: dict[int, str]  # file index -> why it was skipped
    short_side: list[int]  # of each kept image's file
    grayscale: list[bool]  # of each kept image
    note: str = ""  # what the run is told: built or read


def stamps(root: Path, files: list[Path]) -> list[list]:
    """Each file's path under root, size and modification time (ns): what the cache is checked against."""
    out = []
    for f in files:
        try:
            st = f.stat()
            size, time = st.st_size, st.st_mtime_ns
        except OSError:  # gone since the folder was listed: decoding will say so, and no entry matches
            size, time = -1, -1
        out.append([str(f.relative_to(root)) if f != root else f.name, size, time])
    return out


def entry_path(root: Path, size: int, channels: int, cache: Path | None) -> Path:
    """Where a folder's entry at this size and channel count lives (.u8; its .json beside it)."""
    key = hashlib.sha256(f"{root.resolve()}\n{size}\n{channels}".encode("utf-8", "surrogateescape")).hexdigest()
    return (cache or cache_dir()) / "data" / f"{key[:32]}-{size}px-{channels}ch.u8"


def read_entry(path: Path, now: list[list], size: int, channels: int) -> Entry | None:
    """The entry at path if it was made from the files as they are now (`now`: stamps), else None."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        count = len(meta["kept"])
        if (meta.get("format") != FORMAT or meta.pop("digest", None) != _digest(meta) or meta["stamps"] != now
                or path.stat().st_size != count * channels * size * size):
            return None
        images = _mapped(path, count, channels, size)
        return Entry(images, meta["kept"], {int(k): v for k, v in meta["reasons"].items()}, meta["short_side"],
                     meta["grayscale"], f"note: the decoded images come from the cache ({path})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # missing, partial, foreign
        return None


def build_entry(path: Path, root: Path, files: list[Path], before: list[list], size: int, channels: int,
                decoded, progress: Callable[[int, int], None] | None) -> Entry | str:
    """Decode every file (`decoded`: each file's data._try_decode result, in order) into a new entry at path; or
    why the cache could not take it (the run then decodes as it would without a cache).

    A folder that changes while it is read: the run uses the images as read, and the entry is not kept."""
    need = len(files) * channels * size * size
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a build that was killed
            if not _alive(stale.name.split(".")[-2]):
                stale.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < need + SPARE_BYTES:
            return (f"the cache's disk ({path.parent}) has {free / 2**30:.1f} GB free and the images need "
                    f"{need / 2**30:.1f} GB")
        f = open(tmp, "wb")
    except OSError as e:
        return f"the cache at {path.parent} cannot be written ({e.strerror or e})"
    kept, reasons, short_side, grayscale = [], {}, [], []
    try:
        with f:
            for i, result in enumerate(decoded):
                if isinstance(result, str):
                    reasons[i] = result
                else:
                    image, short = result
                    f.write(image.numpy().tobytes())
                    kept.append(i)
                    short_side.append(int(short))
                    grayscale.append(channels == 3 and is_grayscale(image))
                if progress:
                    progress(i + 1, len(files))
        images = _mapped(tmp, len(kept), channels, size)
        if stamps(root, files) != before:  # changed while read: these images are what the run has
            tmp.unlink()  # the mapping lives on; the entry, which would say something untrue, does not
            note = "note: the folder changed while its images were read; this run uses them as read, uncached"
        else:
            path.with_suffix(".json").unlink(missing_ok=True)  # the old entry is gone before the new file lands
            os.replace(tmp, path)
            meta = {"format": FORMAT, "folder": str(root.resolve()), "size": size, "channels": channels,
                    "stamps": before, "kept": kept, "reasons": reasons, "short_side": short_side,
                    "grayscale": grayscale}
            meta["digest"] = _digest(meta)  # a description edited or damaged since is not believed
            atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
            note = f"note: the decoded images are cached in {path} (the next run reads them without decoding)"
    except (OSError, DiskFull) as e:  # the disk filled part-way: nothing of the entry is left
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # images whose description could not be written
        if isinstance(e, OSError) and e.errno not in SPACE_ERRORS and not isinstance(e, PermissionError):
            raise
        return f"the cache at {path.parent} could not be written ({getattr(e, 'strerror', None) or e})"
    return Entry(images, kept, reasons, short_side, grayscale, note)


def _digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _mapped(path: Path, count: int, channels: int, size: int) -> torch.Tensor:
    """The file as a (count, C, S, S) uint8 tensor: pages are read when touched; writes stay private."""
    if count == 0:
        return torch.empty((0, channels, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(count, channels, size, size)))


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
