"""The API's evaluate(): `diffuse eval` as a function. Two sets of images (folders, or a run to sample from
first) scored by FID, KID, precision/recall and copies (evaluation/)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, get_args

import torch

from .diffusion.sampling import SampleConfig
from .errors import DataError, UsageError
from .evaluation import inception
from .evaluation.features import (BUILTIN_REFERENCE, COPY_SIZE, KID_SUBSET_SIZE, Scores, copies_picture,
                                  image_features, image_files, read_images, reference_features,
                                  resized, score, tensor_features)
from .evaluation.inception import Precision, Resize
from .formats.files import MODEL_FILE, STATE_FILE
from .model import Model, PathLike
from .network.device import pick_device


@dataclass
class Evaluation:
    """What evaluate() found: the scores, the closest pairs as a picture, where the samples are, and notes."""

    scores: Scores
    copies_png: torch.Tensor  # uint8 (C, H, W): the closest pairs, sample beside reference image, closest first
    samples: Path | None  # the folder scored (or sampled into; None: a temporary folder, gone)
    reference: str  # the reference, in words
    cached: bool  # whether the reference's features came from the cache
    notes: list[str]


@dataclass(frozen=True)
class EvalSettings:
    """How evaluate() scores: n samples to draw from a run (None: the reference's size, at most 10,000), where to
    keep them (out; None: a temporary folder), the resize to the FID network's input, its precision, the device,
    the reference features' cache folder (None: the default), the seed of KID's subsets, and how a run's samples
    are drawn (sample: sampler, steps and the rest as Model.sample takes them; None: the model's default)."""

    n: int | None = None
    out: PathLike | None = None
    resize: Resize = "tf"
    precision: Precision = "fp32"
    device: str = "auto"
    cache: PathLike | None = None
    seed: int = 0
    sample: SampleConfig | None = None

    def check(self) -> EvalSettings:
        for name, value, choices in (("resize", self.resize, Resize), ("precision", self.precision, Precision)):
            if value not in get_args(choices):
                raise UsageError(f"unknown {{{name}}} {value!r}; choose one of: {', '.join(get_args(choices))}", name)
        if self.n is not None and self.n < 2:
            raise UsageError(f"{{n}} must be at least 2, not {self.n}", "n")
        return self


def evaluate(samples: PathLike | Model, reference: PathLike | None = None, *,
             progress: Callable[[str, float, int], None] | None = None, log: Callable[[str], None] = lambda message: None,
             **settings) -> Evaluation:
    """Score `samples` against `reference`: FID, KID, precision/recall and copies (scores.py).

    samples: a folder of images, or a run (a run folder, a model.safetensors, or a Model) to draw n samples from
    first into `out`, with its default sampler unless `sample` names another. reference: a folder of images
    (default for a run: its training folder, or the built-in shapes it trained on). settings: EvalSettings' fields
    by name (n, out, resize, precision, device, cache, seed, sample). progress(stage, done, total) reports each
    stage: "sampling", "samples", "reference"."""
    if unknown := sorted(settings.keys() - {f.name for f in fields(EvalSettings)}):
        raise UsageError(f"unknown evaluation setting {unknown[0]!r}; the settings are: "
                         f"{', '.join(f.name for f in fields(EvalSettings))}")
    s = EvalSettings(**settings).check()
    n, out, resize, precision, device, cache, seed = s.n, s.out, s.resize, s.precision, s.device, s.cache, s.seed
    stage = (lambda name: (lambda done, total: progress(name, done, total))) if progress else (lambda name: None)
    model = samples if isinstance(samples, Model) else None
    path = None if model is not None else Path(samples)
    if path is not None and not path.exists():
        raise DataError(f"{path}: no such folder or checkpoint")
    if path is not None and (path.suffix == ".safetensors" or (path / MODEL_FILE).exists()):
        from .formats.checkpoint import load_model, resolve_checkpoint

        checkpoint = resolve_checkpoint(path)
        model = Model(*load_model(checkpoint, pick_device(device)), checkpoint)
    if model is None and n is not None:
        raise UsageError("{n} applies to a run, which draws that many samples to score; a folder is scored whole", "n")
    if model is None and s.sample is not None:
        raise UsageError("{name} applies to a run, whose samples it draws; a folder's images are scored as they are",
                         "name")
    sample_files = image_files(path, "samples") if model is None else None
    ref_images, ref_folder, ref_words = _reference(model, reference)
    ref_files = None if ref_folder is None else image_files(ref_folder, "reference")
    if out is not None and model is not None and any(Path(out).glob("*.png")):
        raise UsageError(f"{{out}} {out} already holds images; name a new folder for the samples", "out")
    inception.network_file()  # the extra missing is said before any work
    notes: list[str] = []
    run_device = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="diffuse-eval-") as scratch:
        if model is not None:
            from .api_sample import SampleRun
            from .diffusion.denoiser import SampleHooks

            count = n or min(10_000, len(ref_files) if ref_files is not None else len(ref_images))
            folder = Path(out) if out is not None else Path(scratch) / "samples"
            run = SampleRun(model, count, s.sample or SampleConfig(), folder=folder)
            run.run(SampleHooks(progress=stage("sampling"), log=log))
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
        ref_px = torch.stack(read_images(ref_files, size)) if ref_files is not None else resized(ref_images, size)
        result, copied = score(sample_feats, ref_feats, resize, sample_px, ref_px, seed)
        if result.kid_subset < KID_SUBSET_SIZE:
            notes.append(f"KID over subsets of {result.kid_subset} (the smaller set's size), not {KID_SUBSET_SIZE}: "
                         "compare it only with KIDs on subsets of the same size")
        picture = copies_picture(sample_px, ref_px, copied)
        kept = None if model is not None and out is None else (folder if model is not None else path)
    return Evaluation(result, picture, kept, ref_words, cached, notes)


def _reference(model, reference) -> tuple[torch.Tensor | None, Path | None, str]:
    """(images held in memory, or None; the reference folder, or None; the reference in words): the folder given,
    else the run's training folder, or the built-in shapes it trained on."""
    if reference is not None:
        return None, Path(reference), str(reference)
    if model is None:
        raise UsageError("name the reference: diffuse eval SAMPLES REFERENCE (two folders of images)")
    from .images.data import BUILTIN, load_builtin
    from .training.runs import data_of_run

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


