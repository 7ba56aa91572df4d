"""What sampling writes: numbered PNGs as they come, grid.png, the folder they go to, and a trajectory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..diffusion.pixels import to_uint8
from .pictures import grid_upscale, make_grid, save_gif, save_png
from ..errors import UsageError

PathLike = str | os.PathLike
GRID_MAX = 64  # a grid.png shows at most this many images: an 8x8 grid
ROW_MAX = 16  # a grid row of a class or an init shows at most this many of its images


def save_grid(images: torch.Tensor | list[torch.Tensor], path: PathLike) -> None:
    """Write the first GRID_MAX of uint8 (N, C, H, W) images (or a list of such batches) as one PNG grid,
    enlarged so that small images can be seen."""
    images = torch.cat(images) if isinstance(images, list) else images
    save_png(make_grid(images[:GRID_MAX]), path, grid_upscale(images.shape[-1]))


def save_images(images: torch.Tensor, folder: PathLike, start: int = 0, digits: int = 4,
                grid: bool = True) -> list[Path]:
    """Write uint8 (N, C, H, W) images as folder/NNNN.png (numbered from `start`), and grid.png of the
    first 64; returns the image paths."""
    folder, paths = Path(folder), []
    for i, image in enumerate(images):
        paths.append(folder / f"{start + i:0{digits}d}.png")
        save_png(image, paths[-1])
    if grid:
        save_grid([images], folder / "grid.png")
    return paths


def save_strip(frames: torch.Tensor, folder: PathLike) -> None:
    """Interpolation frames uint8 (N, C, H, W) as NNNN.png, strip.png (one row) and strip.gif (there and back)."""
    folder = Path(folder)
    save_images(frames, folder, grid=False)
    upscale = grid_upscale(frames.shape[-1])
    save_png(make_grid(frames, nrow=len(frames)), folder / "strip.png", upscale)
    big = [f.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2) for f in frames]
    save_gif(big + big[-2:0:-1], folder / "strip.gif", ms_per_frame=150)


def check_folder(folder: Path) -> Path:
    """Refuse, before any work, an output folder that is a file or is named like one."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; name a folder for the images with {{out}}", "out")
    if not folder.exists() and folder.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif"):
        raise UsageError(f"{{out}} {folder} names the folder for the PNGs (and grid.png), not a file: "
                         f"e.g. {{out}} {folder.with_suffix('')}", "out")
    return folder


def layout(n: int, classes: list[str] | None, init_names: list[str] | None = None,
           heads: torch.Tensor | None = None) -> tuple[list[str] | None, int | None, torch.Tensor | None]:
    """How a sample folder shows a request: each image's file-name suffix (its init's name, its class), the length of
    a grid row (None: a plain grid), and the image opening each row (`heads`: each init, one a row). n: images of
    each class, for each init; classes: the class of each image of an init, where classes were asked."""
    if init_names is None:
        return classes, None if classes is None else n, None
    per_init = n if classes is None else len(classes)
    suffixes = [name if classes is None else f"{name}-{c}" for name in init_names for c in classes or [None] * n]
    return suffixes, n, None if heads is None else heads.repeat_interleave(per_init // n, 0)


class SampleFolder:
    """Samples written to a folder as they come (Ctrl-C keeps what was made): NNNN.png, or NNNN-<suffix>.png
    (the class, the init's name), then grid.png: the first 64, or a row for each class or init (`row`
    images each), opened by `heads` (the init, one a row) when given; and a Trajectory's pictures, if given."""

    def __init__(self, folder: PathLike, total: int, suffixes: list[str] | None = None, row: int | None = None,
                 heads: torch.Tensor | None = None, trajectory: Trajectory | None = None):
        self.folder, self.total, self.written, self.kept = Path(folder), total, 0, []
        self.suffixes, self.row, self.heads, self.trajectory = suffixes, row, heads, trajectory
        self.digits = max(4, len(str(total - 1)))  # 0000.png ...: names sort in order however many there are

    def add(self, batch: torch.Tensor) -> None:
        for image in batch:
            suffix = "" if self.suffixes is None else f"-{self.suffixes[self.written]}"
            save_png(image, self.folder / f"{self.written:0{self.digits}d}{suffix}.png")
            self.written += 1
        self.kept.append(batch)

    def finish(self) -> str:
        """Write grid.png (and the trajectory's trajectory.png and .gif, when kept); returns what it shows, in words."""
        images = torch.cat(self.kept)
        if self.trajectory is not None:
            save_png(self.trajectory.strip(), self.folder / "trajectory.png", grid_upscale(images.shape[-1]))
            save_gif(self.trajectory.animation(), self.folder / "trajectory.gif")
        if self.row is None:
            save_grid(images, self.folder / "grid.png")
            return "grid.png" if len(images) <= GRID_MAX else f"grid.png (the first {GRID_MAX})"
        columns = min(self.row, ROW_MAX)
        rows = images[:len(images) // self.row * self.row].view(-1, self.row, *images.shape[1:])[:GRID_MAX // 2, :columns]
        if self.heads is not None:
            rows = torch.cat([self.heads[:len(rows), None], rows], 1)
        grid = make_grid(rows.flatten(0, 1), nrow=rows.shape[1])
        save_png(grid, self.folder / "grid.png", grid_upscale(images.shape[-1]))
        if self.heads is not None:
            what = "a row for each init, the init first"
        else:
            what = "a row of each class" if len(rows) > 1 else "one row"
        first = f", the first {columns}{' of each' if len(rows) > 1 else ''}" if columns < self.row else ""
        return f"grid.png ({what}{first})"


class Trajectory:
    """A sampling callback that keeps x_t and the predicted x_0 of the first image at every step of the
    first batch, for a strip (10 steps: x_t above, x̂_0 below) and an animation."""

    def __init__(self) -> None:
        self.frames: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.full = False

    def __call__(self, i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        self.full = self.full or (i == 0 and bool(self.frames))  # step 0 again: a second batch
        if not self.full:
            self.frames.append((to_uint8(x_t[0]).cpu(), to_uint8(x0[0]).cpu()))

    def strip(self, columns: int = 10) -> torch.Tensor:
        """x_t (top row) and x̂_0 (bottom row) at `columns` evenly spaced steps: one uint8 (C, H, W) image."""
        picks = sorted({round(k * (len(self.frames) - 1) / (columns - 1)) for k in range(columns)})
        return make_grid(torch.stack([self.frames[k][0] for k in picks] + [self.frames[k][1] for k in picks]),
                         nrow=len(picks))

    def animation(self) -> list[torch.Tensor]:
        """One uint8 (C, H, W) frame a step: x_t beside x̂_0."""
        return [make_grid(torch.stack(pair), nrow=2) for pair in self.frames]
