"""Run folders: naming a new one, finding the one to resume, and the config a resumed run keeps."""

from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..config import Config, split_fields, validate_train
from ..errors import RunError
from ..formats.files import STATE_FILE, newest


def new_run_folder(data: Optional[str], preset: str) -> Path:
    """checkpoints/<data folder>-<preset>-<time> (no preset where it is yet to be chosen: ""), made unique with a
    suffix."""
    stem = Path(data).resolve().name if data else "shapes"
    base = Path("checkpoints") / "-".join(p for p in (stem, preset, time.strftime('%Y%m%d-%H%M%S')) if p)
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def resolve_run(out_dir: Optional[Path], resume: Optional[str], data: Optional[str], preset: str,
                confirm: Optional[Callable[[str], bool]] = None) -> tuple[Path, bool]:
    """(run folder, whether to resume it), following --out and --resume.

    `confirm(question)` is asked before resuming a run that --out names without --resume; with
    no one to ask (None: not a terminal), that is an error rather than a guess.
    """
    from .distributed import launched_by_torchrun

    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{{out}} {out_dir} is a file; name a folder for the run", "out")
    if resume not in (None, "auto"):
        run = Path(resume)
        run = run.parent if run.is_file() else run
        if not (run / STATE_FILE).exists():
            raise RunError(f"{run}: no {STATE_FILE} to resume from")
        return run, True
    if resume == "auto" and out_dir is None:
        if (state := newest(Path("checkpoints"), STATE_FILE, below="*")) is not None:
            return state.parent, True
    if out_dir is None:
        if launched_by_torchrun():
            raise RunError("under torchrun, pass {out} so that every process writes to the same run folder", "out")
        return new_run_folder(data, preset), False
    if (out_dir / STATE_FILE).exists():
        if resume == "auto" or (confirm is not None and confirm(f"{out_dir} already holds a run. Resume it?")):
            return out_dir, True
        raise RunError(f"{out_dir} already holds a run; pass {{resume}} auto to continue it, or choose another {{out}}",
                       "resume", "out")
    return out_dir, False


@contextmanager
def claim(run: Path) -> Iterator[None]:
    """Create the run folder and hold it while the block runs: a second `diffuse train` into the same
    folder (two terminals, a job launched twice) is refused instead of interleaving its checkpoints.

    The lock is flock on the folder itself, so nothing is left behind and a killed process lets go at
    once; where the OS or file system cannot lock a folder (Windows, some network mounts) nothing is held.
    """
    run.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(run, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunError(f"{run} is being trained by another diffuse process; wait for it, stop it, "
                               "or choose another {out}", "out") from None
        yield
    finally:
        os.close(fd)  # closing the folder releases the lock


def data_of_run(run: Path) -> Optional[str]:
    """The image folder a run trains on, as its training state records it; None for the built-in shapes."""
    from ..formats.checkpoint import read_metadata
    from ..images.data import BUILTIN

    _, info = read_metadata(run / STATE_FILE, "diffuse/training-state")
    source = info.get("data")
    if source in (None, BUILTIN):
        return None
    if not Path(source).exists():
        raise RunError(f"{run} trained on {source}, which is not there any more; name its images: "
                       f"diffuse train FOLDER --resume {run}")
    return source


def config_for_run(run: Path, preset: Optional[str], settings: dict[str, Any]) -> Config:
    """The config of the run being resumed, with the training settings given now (a longer --steps, a new
    --lr); a setting of the model or the forward process cannot change on resume."""
    from ..formats.checkpoint import read_metadata

    saved, _ = read_metadata(run / STATE_FILE, "diffuse/training-state")
    if preset is not None and preset != saved.preset:
        raise RunError(f"{{preset}} {preset} differs from the run being resumed ({saved.preset}); "
                       "the model cannot change on resume", "preset")
    model, diffusion, train = split_fields(settings)
    for name, value in {**model, **diffusion}.items():
        current = getattr(saved.model, name, getattr(saved.diffusion, name, None))
        if value != current:
            raise RunError(f"--{name.replace('_', '-')} {value} differs from the run being resumed "
                           f"({current}); the model cannot change on resume")
    return replace(saved, train=validate_train(replace(saved.train, **train)))
