"""Post-hoc EMA from the API: the EMA of any length rebuilt after training from a run's snapshots
(training/posthoc_ema.py), or the best of a range of lengths by FID against the run's training images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import RunError, UsageError
from .formats.checkpoint import read_metadata
from .formats.files import MODEL_FILE, STATE_FILE
from .model import Model, PathLike
from .network.device import pick_device, resolve_precision
from .network.unet import UNet

# The lengths `length="best"` scores: EDM2 found the best between 0.02 and 0.2 for its models and budgets.
EMA_LENGTHS = (0.025, 0.05, 0.075, 0.10, 0.15, 0.20)


@dataclass
class EmaChoice:
    """The EMA chosen (its model written to `model.path`) and, for "best", the FID of each length scored."""

    model: Model
    length: float
    step: int
    scores: dict[float, float] = field(default_factory=dict)  # σ_rel -> FID
    trained_ema_fid: float | None = None  # the run's own model.safetensors (its EMA during training), scored alike


def posthoc_ema(run: PathLike, length: float | str = 0.05, out: PathLike | None = None, *,
                lengths: tuple[float, ...] = EMA_LENGTHS, n: int = 1000, device: str = "auto",
                progress: Callable[[str, float, int], None] = lambda stage, done, total: None,
                log: Callable[[str], None] = lambda message: None) -> EmaChoice:
    """The EMA of length σ_rel = `length` (a share of the training, as EDM2 measures it) at the run's last
    snapshot, written as `out`/model.safetensors (default: `<run>-ema-<length>` beside the run); or with
    length="best", of each of `lengths` scored by FID of n samples against as many training images, the best
    kept. `progress(stage, done, total)` hears of each network call, stage the length being scored."""
    from .training import posthoc_ema as phema

    run = Path(run)
    if not (run / STATE_FILE).exists():
        raise RunError(f"{run}: not a run folder (no {STATE_FILE}); give the folder `diffuse train` wrote")
    if length != "best":
        if isinstance(length, str):
            try:
                length = float(length)
            except ValueError:
                raise UsageError(f"{{length}} is a number such as 0.05, or best; not {length!r}", "length") from None
        check_length(length)
    for each in lengths:
        check_length(each)
    if n < 1:
        raise UsageError(f"{{n}} must be at least 1, not {n}", "n")
    if out is not None:
        nothing_at(Path(out))  # said before any scoring
    snaps = phema.Snapshots(run)
    torch_device = pick_device(device)
    net = UNet(snaps.config.model).to(torch_device).eval().requires_grad_(False)
    scores, trained = {}, None
    if length == "best":
        from .images.data import load_data
        from .training.fid_watch import FidWatch
        from .training.runs import data_of_run

        m = snaps.config.model
        watch = FidWatch(load_data(data_of_run(run), m.image_size, m.channels), n, torch_device)
        precision = resolve_precision("auto", torch_device)
        for each in lengths:
            net.load_state_dict(snaps.rebuild(each))
            scores[each], _ = watch(net, snaps.config, precision, log,
                                    lambda done, total, each=each: progress(f"σ_rel {each:g}", done, total))
        if (run / MODEL_FILE).exists():
            from .formats.checkpoint import load_model

            trained_net, _, _ = load_model(run / MODEL_FILE, torch_device)
            trained, _ = watch(trained_net, snaps.config, precision, log,
                               lambda done, total: progress("the run's EMA", done, total))
        length = min(scores, key=scores.get)
    net.load_state_dict(snaps.rebuild(length))
    out = Path(out) if out is not None else run.parent / f"{run.name}-ema-{length:.3f}"
    nothing_at(out)
    info = read_metadata(run / MODEL_FILE)[1] if (run / MODEL_FILE).exists() else dict(snaps.info)
    info |= {"step": snaps.step, "weights": f"post-hoc EMA, σ_rel {length:g}", "ema_length": length,
             **({"ema_fids": {f"{k:g}": v for k, v in scores.items()}} if scores else {})}
    model = Model(net, snaps.config, info)
    model.save(out / MODEL_FILE)
    return EmaChoice(model, length, snaps.step, scores, trained)


def nothing_at(out: Path) -> None:
    """Refuse a folder that holds a model already: nothing a user has is written over."""
    if (out / MODEL_FILE).exists():
        raise RunError(f"{out / MODEL_FILE} is there already; name another folder with {{out}}", "out")


def check_length(length: float) -> None:
    from .training.posthoc_ema import SIGMA_REL_MAX

    if not 0 < length < SIGMA_REL_MAX:
        raise UsageError(f"{{length}} is a share of the training between 0 and {SIGMA_REL_MAX:.3f} (0.05 to 0.2 is "
                         f"usual), not {length}", "length")


def check_eval_ema(options, config, run: Path | None) -> None:
    """train(eval_ema=...)'s lengths, refused in one line before any work where the run cannot score them."""
    if options.eval_every is None:
        raise UsageError("{eval_ema} picks the post-hoc EMA lengths each {eval_every} FID scores; give {eval_every} "
                         "too", "eval_ema", "eval_every")
    for each in options.eval_ema:
        check_length(each)
    if not config.train.posthoc_ema:
        raise UsageError("{eval_ema} rebuilds each length from the run's post-hoc EMA snapshots, which "
                         "{posthoc_ema} off does not keep", "eval_ema", "posthoc_ema")
    if run is None:
        raise UsageError("{eval_ema} reads the snapshots in the run folder; give {out}", "eval_ema", "out")
