"""The API's pictures of the diffusion: the forward process on an image (noise), the time slider (explore and its
page) and interpolation between images or seeds, each drawn through the sampling pipeline (diffusion/denoiser.py).

Like everything in the API, nothing here prints or exits; bad input raises a DiffuseError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .config import DiffusionConfig, Schedule, check_choice, check_guidance, check_seed
from .diffusion.pixels import to_model, to_uint8
from .errors import DataError, UsageError, Words
from .formats.files import atomic_folder, atomic_write_bytes
from .images.inputs import read_edit
from .model import Model, PathLike
from .diffusion.sampling import INTERPOLATE_STEPS, SampleConfig, SamplerChoice
from .diffusion.schedule import NoiseSchedule


def noise(image: PathLike | torch.Tensor, t: list[int] | int, schedule: Schedule = DiffusionConfig.schedule,
          timesteps: int = DiffusionConfig.timesteps, seed: int = 0, image_size: int | None = None,
          max_side: int = 1024) -> torch.Tensor:
    """x_t of q(x_t | x_0) at each t (t = 0: the image, t = T: pure noise) with one ε: uint8 (len(t), C, H, W).

    image: a file (read at its own size, shrunk to max_side on its long side if longer, or resized
    and centre-cropped to image_size as training does) or a uint8 (C, H, W) tensor."""
    from .images.decode import TooLarge, decode_image, read_image

    ts = [t] if isinstance(t, int) else list(t)
    check_choice(schedule, Schedule, "schedule")
    if timesteps < 2:
        raise UsageError(f"{{timesteps}} must be at least 2, not {timesteps}", "timesteps")
    if bad := [k for k in ts if not 0 <= k <= timesteps]:
        raise UsageError(f"{{t}} {bad[0]} is outside [0, {timesteps}] (0 is the clean image, {timesteps} pure noise)",
                         "t")
    if image_size is not None and image_size < 1:
        raise UsageError(f"{{image_size}} must be at least 1, not {image_size}", "image_size")
    if max_side < 0:
        raise UsageError(f"{{max_side}} must be 0 (never shrink) or more, not {max_side}", "max_side")
    check_seed(seed)
    if isinstance(image, torch.Tensor):
        x0 = to_model(image)[None]
    else:
        image = Path(image)
        if image.is_dir():
            raise DataError(f"{image}: is a folder; give one image file")
        if not image.is_file():
            raise DataError(f"{image}: no such file")
        try:
            x0 = to_model(read_image(image, max_side=max_side) if image_size is None
                          else decode_image(image, image_size))[None]
        except TooLarge as e:
            hint = "; {max_side} N reads a JPEG at a reduced scale" if image_size is None and not max_side else ""
            raise DataError(f"{image}: too large to show ({e}){hint}", *["max_side"] * bool(hint)) from None
        except Exception as e:  # any decoder failure is the user's file, not our bug
            raise DataError(f"{image}: cannot read as an image ({e})") from None
    sched = NoiseSchedule.make(schedule, timesteps)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return torch.stack([to_uint8(x0[0] if k == 0 else sched.q_sample(x0, torch.tensor([k - 1]), eps)[0]) for k in ts])


def write_noise(image: PathLike, t: list[int] | int, out: PathLike, schedule: Schedule = DiffusionConfig.schedule,
                timesteps: int = DiffusionConfig.timesteps, seed: int = 0, image_size: int | None = None,
                max_side: int = 1024) -> Words:
    """noise()'s panels written as one PNG at `out` (a strip labelled with each t, when several; at image_size,
    enlarged nearest so that each pixel of noise stays a pixel); returns what size it shows, in words."""
    from .images.decode import image_dimensions
    from .images.pictures import grid_upscale, labelled_strip, save_png

    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{{out}} {out} is a folder; name the PNG to write, e.g. {{out}} {out / 'noise.png'}", "out")
    if out.suffix.lower() != ".png":
        raise UsageError(f"{{out}} {out}: the noise panels are written as a PNG; name it {out.with_suffix('.png')}",
                         "out")
    ts = [t] if isinstance(t, int) else list(t)
    panels = noise(image, ts, schedule, timesteps, seed, image_size, max_side)
    zoom = grid_upscale(image_size) if image_size else 1
    panels = panels.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    save_png(panels[0] if len(ts) == 1 else labelled_strip(list(panels), [f"t = {k}" for k in ts]), out)
    size = f"{image_size}x{image_size} as a model sees it" if image_size else f"{panels.shape[-1]}x{panels.shape[-2]}"
    if not image_size and (own := image_dimensions(image)) != (panels.shape[-1], panels.shape[-2]):
        return Words(f"{size}, shrunk from {own[0]}x{own[1]}; {{max_side}} 0 keeps every pixel", "max_side")
    return Words(size)


def explore(model: Model, image: PathLike | torch.Tensor | None = None, frames: int = 60, seed: int = 0,
            class_name: str | None = None, guidance: float = SampleConfig.guidance):
    """The time slider's frames (slider.Frames) for an image (a file, resized and cropped as training does,
    or a uint8 (C, H, W) tensor at the model's size; None: one of the run's training images), walking back
    into `class_name` on a conditional model."""
    from .diffusion.slider import explore_frames

    if frames < 2:
        raise UsageError(f"{{frames}} must be at least 2, not {frames}", "frames")
    check_guidance(guidance)
    check_seed(seed)
    from .diffusion.denoiser import class_labels, for_student

    label = None if class_name is None else int(class_labels(model.config, (class_name,), 1)[0])
    if model.config.distill is not None:  # its guidance is in its weights; another is refused as sample refuses it
        guidance = for_student(model.config, SampleConfig(guidance=guidance)).guidance
    x = _explore_image(model, image, seed) if not isinstance(image, torch.Tensor) else image
    m = model.config.model
    if tuple(x.shape) != (m.channels, m.image_size, m.image_size):
        raise DataError(f"the image is {tuple(x.shape)}; this model takes ({m.channels}, {m.image_size}, "
                        f"{m.image_size})")
    return explore_frames(model.net, model.config, x, frames, seed, label, guidance)


def _explore_image(model: Model, image: PathLike | None, seed: int) -> torch.Tensor:
    """The image to explore, decoded as training decodes it: a file, or else one of the run's training images."""
    from .training import runs
    from .images.data import BUILTIN, find_files
    from .images.shapes import render_shapes

    m = model.config.model
    if image is None:
        data = model.info.get("data")
        if data == BUILTIN:
            return render_shapes(seed + 1, m.image_size, seed=0)[seed]
        folder = None
        if model.path is not None and (model.path.parent / "training_state.safetensors").exists():
            folder = runs.data_of_run(model.path.parent)
        files = find_files(Path(folder)) if folder else []
        if not files:
            raise UsageError("the run's training images are not here; name an image: diffuse explore photo.png")
        image = files[seed % len(files)]
    if Path(image).is_dir():
        raise DataError(f"{image}: is a folder; give one image file")
    return read_edit(image, None, m.image_size, m.channels, strict=False).images[0]


def interpolation_folder_name(model: Model, a: PathLike | None, b: PathLike | None, seeds: tuple[int, int] | None,
                              steps: int = INTERPOLATE_STEPS) -> Path:
    """samples/<run>-interpolate-<a>-<b>-<steps>steps, or -seeds<A>-<B>-: where `diffuse interpolate` writes."""
    ends = f"{Path(a).stem}-{Path(b).stem}" if seeds is None else f"seeds{seeds[0]}-{seeds[1]}"
    return Path("samples") / f"{model.path.parent.name}-interpolate-{ends}-{steps}steps"


def interpolate(model: Model, a: PathLike | torch.Tensor | None = None, b: PathLike | torch.Tensor | None = None,
                frames: int = 9, seeds: tuple[int, int] | None = None, steps: int = INTERPOLATE_STEPS,
                class_name: str | None = None, progress: Callable[[int, int], None] | None = None,
                out: PathLike | None = None) -> torch.Tensor:
    """uint8 (frames, C, H, W) from a to b: two images inverted to noise by DDIM (η = 0), or two seeds' noises,
    interpolated spherically and sampled back by DDIM on the same `steps` (a distilled student: its own); on a
    conditional model, of class `class_name` (None: no class). With `out`, also written there (save_strip; the folder checked first)."""
    from .images.outputs import check_folder, save_strip

    folder = None if out is None else check_folder(Path(out))
    from .diffusion.denoiser import Denoiser, SampleHooks, class_labels
    from .diffusion.editing import slerp
    from .diffusion.samplers import randn, spaced_timesteps

    if (seeds is None) == (a is None or b is None) or (seeds is not None and (a is not None or b is not None)):
        raise UsageError("give two images, or {seeds} A B, to interpolate between", "seeds")
    for seed in seeds or ():
        check_seed(seed, "seeds")
    if frames < 2:
        raise UsageError(f"{{frames}} must be at least 2, not {frames}", "frames")
    if (d := model.config.distill) is not None:  # a student walks its own grid, the only one it learnt
        if steps not in (INTERPOLATE_STEPS, d.steps):
            raise UsageError(f"this model is distilled to {d.steps} ddim steps; interpolate it without {{steps}}",
                             "steps")
        steps = d.steps
    SamplerChoice("ddim", steps).check(model.config.diffusion.timesteps)
    label = None if class_name is None else class_labels(model.config, (class_name,), 1)
    m, denoiser = model.config.model, Denoiser(model.net, model.config, hooks=SampleHooks(progress=progress))
    ts = spaced_timesteps(denoiser.schedule, steps, "trailing")
    batch = model.sampling_batch(frames)
    denoiser.count(steps * ((2 if seeds is None else 0) + -(-frames // batch)))
    labels = lambda count: None if label is None else label.expand(count)  # noqa: E731
    if seeds is None:
        images = torch.cat([read_edit(x, None, m.image_size, m.channels).images[:1] for x in (a, b)])
        ends = denoiser.invert(to_model(images).to(model.device), ts, labels(2))
    else:
        shape = (1, m.channels, m.image_size, m.image_size)
        ends = torch.cat([randn(shape, torch.Generator().manual_seed(seed), model.device) for seed in seeds])
    noises = torch.cat([slerp(ends[:1], ends[1:], w) for w in torch.linspace(0, 1, frames).tolist()])
    walked = [denoiser.walk(part, ts, labels(len(part))) for part in noises.split(batch)]
    shown = to_uint8(torch.cat(walked)).cpu()
    if folder is not None and folder.exists():  # a folder the user named, already there: each file atomic
        save_strip(shown, folder)
    elif folder is not None:
        with atomic_folder(folder) as partial:  # a new folder appears whole, or not at all
            save_strip(shown, partial)
    return shown


def explorer_path(path: PathLike) -> Path:
    """`path` if the time slider's page can be written there (an .html or .htm file), else a UsageError."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"{{out}} {path}: the time slider is an HTML page; name it e.g. explore.html", "out")
    return path


def write_explorer(frames, path: PathLike, title: str = "diffuse: the time slider") -> Path:
    """Write the time slider's page (slider_page) to `path` (explorer_path), atomically; returns the path."""
    from .images.slider_page import page

    path = explorer_path(path)
    atomic_write_bytes(path, page(frames, title).encode())
    return path
