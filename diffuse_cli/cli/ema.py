"""`diffuse ema`: the EMA of any length, rebuilt after training from a run's post-hoc EMA snapshots, or the best of a
range by FID (api_ema.py). app.py registers COMMANDS on its app; like every command, it parses, calls, prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as opt
from .console import out, progress_bar, styled

EmaRun = Annotated[Path, typer.Argument(help="The run folder (its ema/ snapshots).", show_default=False)]
Length = Annotated[str, typer.Option("--length", help="The EMA's length σ_rel, a share of the training (0.05 to 0.2 "
                                     "is usual), or best: score a range by FID against the training images and "
                                     "keep the best.")]
EmaOut = Annotated[Optional[Path], typer.Option("--out", help="Folder for its model.safetensors. \\[default: "
                                                "<run>-ema-<length> beside the run]", show_default=False)]
EmaN = Annotated[int, typer.Option("-n", "--num", help="With --length best: samples each FID is of (and training "
                                   "images, at most the data set's size).")]


def ema(run: EmaRun, length: Length = "0.05", out_dir: EmaOut = None, n: EmaN = 1000,
        device: opt.Device = "auto", threads: opt.Threads = None) -> None:
    """Rebuild the EMA of any length from a run's snapshots (post-hoc EMA), or pick the best by FID."""
    from .. import api

    api.prepare_device(device, threads)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: float, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        chosen = api.posthoc_ema(run, length, out_dir, n=n, device=device, progress=progress,
                                 log=lambda m: bar.console.print(styled(m), highlight=False, soft_wrap=True))
    if chosen.scores:
        from rich.table import Table

        table = Table(title=f"FID of {n} samples at step {chosen.step}, by EMA length", title_justify="left")
        table.add_column("σ_rel", justify="right")
        table.add_column("FID", justify="right")
        for length_, fid in chosen.scores.items():
            table.add_row(f"{length_:g}", f"{fid:.2f}" + (" (best)" if length_ == chosen.length else ""))
        if chosen.trained_ema_fid is not None:
            table.add_row("the run's EMA", f"{chosen.trained_ema_fid:.2f}")
        out.print(table)
    out.print(f"the EMA of length {chosen.length:g} at step {chosen.step}: {chosen.model.path} "
              f"(diffuse sample --checkpoint {chosen.model.path.parent})", highlight=False)


# (name, examples, function): what app.py registers.
COMMANDS = [
    ("ema", "Examples:\n\n  diffuse ema checkpoints/<run> --length 0.1    # the EMA of a tenth of the training\n\n"
            "  diffuse ema checkpoints/<run> --length best   # score 0.025 to 0.2 by FID, keep the best", ema),
]
