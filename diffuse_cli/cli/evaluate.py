"""`diffuse eval`: FID, KID, precision/recall and copies of two folders, or of a run's samples (evaluation/).

app.py registers COMMANDS on its app; like every command, it parses, calls the API, prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError, worded
from . import options as opt
from .console import out, progress_bar, styled

Samples = Annotated[Path, typer.Argument(help="A folder of images, or a run (a run folder or model.safetensors) to "
                                         "sample from first.", show_default=False)]
Reference = Annotated[Optional[Path], typer.Argument(help="A folder of images. \\[default for a run: the folder it "
                                                     "trained on, or the built-in shapes]", show_default=False)]
Count = Annotated[Optional[int], typer.Option("-n", "--num", help="With a run: how many samples to draw and score. "
                                             "\\[default: the reference's size, at most 10,000]", show_default=False)]
EvalOut = Annotated[Optional[Path], typer.Option("--out", help="With a run: keep the samples in this folder. "
                                                 "\\[default: a temporary folder]", show_default=False)]
ResizeOpt = Annotated[str, typer.Option("--resize", help="How images reach the network's 299x299: tf (TensorFlow 1.x "
                                        "bilinear, as the papers' FIDs), pytorch (pytorch-fid's) or clean "
                                        "(clean-fid's PIL bicubic).")]
Copies = Annotated[Path, typer.Option("--copies", help="Where to write the closest pairs (sample beside its nearest "
                                      "reference image, closest first).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")]
EvalPrecision = Annotated[str, typer.Option("--precision", help="fp32 (the reference network's own arithmetic) or bf16 "
                                            "(about twice as fast where the hardware has it; moves FID by a few "
                                            "tenths of a percent, so not the papers' numbers).")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where reference features are cached. "
                                                  "\\[default: $DIFFUSE_CACHE, else ~/.cache/diffuse]",
                                                  show_default=False)]


def eval_(samples: Samples, reference: Reference = None, n: Count = None, out_dir: EvalOut = None,
          resize: ResizeOpt = "tf", precision: EvalPrecision = "fp32", copies: Copies = Path("copies.png"),
          as_json: AsJson = False, sampler: opt.Sampler = None, steps: opt.SampleSteps = None,
          cache_dir: CacheDir = None, device: opt.Device = "auto", threads: opt.Threads = None) -> None:
    """Score samples against a reference: FID, KID, precision/recall, and copies of the training set."""
    from .. import api

    if copies.is_dir() or copies.suffix.lower() != ".png":
        raise UsageError(f"--copies {copies}: diffuse eval writes a PNG there; name it e.g. copies.png")
    sampling = opt.given(sampler=sampler, steps=steps)
    sample = api.SampleConfig.of(**sampling).check(n=n) if sampling else None  # None: the run's default
    api.prepare_device(device, threads)
    stages = {"sampling": "sampling", "samples": "scoring the samples", "reference": "scoring the reference"}
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: float, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stages[stage], total=total)
            bar.update(tasks[stage], completed=done, total=total)

        said = api.evaluate(samples, reference, n=n, out=out_dir, resize=resize, precision=precision, device=device,
                            cache=cache_dir, sample=sample,
                            progress=progress, log=lambda m: bar.console.print(styled(m), highlight=False, soft_wrap=True))
    api.save_png(said.copies_png, copies, api.grid_upscale(said.copies_png.shape[-1] // 2))
    s = said.scores
    if as_json:
        print(json.dumps(s.as_json()))
        return
    for note in said.notes:
        out.print(styled(f"note: {worded(note, opt.flag)}"), highlight=False)
    from rich.table import Table

    table = Table(title=f"{s.n_samples} samples against {s.n_reference} reference images ({said.reference}), "
                        f"resize {s.resize}", title_justify="left")
    table.add_column("score")
    table.add_column("value", justify="right")
    table.add_column("means")
    table.add_row("FID", f"{s.fid:.2f}", "lower is better; 0 for the same set")
    table.add_row("KID", f"{s.kid_mean:.4f} ± {s.kid_std:.4f}", f"lower is better; subsets of {s.kid_subset}")
    table.add_row("precision", f"{s.precision:.3f}", "share of samples that look like the reference")
    table.add_row("recall", f"{s.recall:.3f}", "share of the reference the samples cover")
    table.add_row("copies", f"{s.copies} of {s.n_samples}", f"near-copies of a reference image; see {copies}")
    out.print(table)
    where = f"; the samples are in {said.samples}/" if said.samples is not None and said.samples != Path(samples) else ""
    out.print(f"reference features {'from the cache' if said.cached else 'computed and cached'}{where}",
              highlight=False)


# (name, examples, function): what app.py registers.
COMMANDS = [
    ("eval", "Examples:\n\n  diffuse eval samples/ photos/              # two folders of images\n\n"
             "  diffuse eval checkpoints/<run> -n 1000     # sample from the run, score against its data\n\n"
             "  diffuse eval checkpoints/<run> -n 1000 --sampler dpm++2m --steps 10   # another sampler's FID\n\n"
             "  diffuse eval samples/ photos/ --json --resize clean", eval_),
]
