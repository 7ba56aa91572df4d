"""Writing files so that a crash at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import DiskFull

MODEL_FILE = "model.safetensors"  # a run folder's EMA weights: what sampling loads
STATE_FILE = "training_state.safetensors"  # weights, EMA and optimizer: what resuming loads
def newest(root: Path, name: str, below: str = "**") -> Path | None:
    """The most recently written file called `name` in root's folders matching `below` ("**": at any depth; "*": one
    down), or None."""
    found = sorted(root.glob(f"{below}/{name}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None


BEST_MODEL_FILE = "model_best.safetensors"  # with train --eval-every: the EMA weights of the best FID so far
LOSS_PLOT = "loss.png"  # loss and learning rate against step, redrawn with every sample grid


CACHE_ENV = "DIFFUSE_CACHE"  # where decoded images and reference features are kept (default: ~/.cache/diffuse)


def cache_dir() -> Path:
    """$DIFFUSE_CACHE, else $XDG_CACHE_HOME/diffuse, else ~/.cache/diffuse."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffuse"


# A write that fails with one of these is out of room (or of quota, or of a working disk), not a bug or bad input.
SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, and rename over `path`; a full disk is DiskFull,
    naming the file and the space it needed, with the old file intact and no temporary left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _full(e, path, len(data)) if e.errno in SPACE_ERRORS else e
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp's 0600 would hide the file from everyone else
        with os.fdopen(fd, "wb") as f:
            _write(f, data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in SPACE_ERRORS:
            raise _full(e, path, len(data)) from None
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new folder written whole or not at all: the body fills a temporary sibling, renamed to `path` (new, or an
    empty folder) at the end; an error or a kill leaves no half folder under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.partial-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from everyone else
        yield tmp
        os.replace(tmp, path)  # rename(2) replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _write(f, data: bytes) -> None:
    """Write, flush and fsync: where a full disk shows itself (the write, or the flush of what was buffered)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _full(error: OSError, path: Path, size: int) -> DiskFull:
    try:
        free = f"; {_amount(shutil.disk_usage(path.parent).free)} free there"
    except OSError:
        free = ""
    return DiskFull(f"could not write {path}: {error.strerror or error} (it needs {_amount(size)}{free}); what was "
                    "there before is intact")


def _amount(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB"


def _mode_for(path: Path) -> int:
    """The permissions of the file being replaced, or those a new file gets under this umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
