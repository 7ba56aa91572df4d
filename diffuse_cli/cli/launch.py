"""`diffuse train --devices N`: the same command again, as N processes under torchrun (DDP)."""

from __future__ import annotations

import os
import signal

from .console import STARTED_ENV, Interrupted, process_started
from ..errors import TrainingFailed


def launch_devices(devices: int, device: str, argv: list[str]) -> None:
    """Re-run `diffuse ARGV` (less --devices) under torchrun with `devices` processes on this machine."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from .. import api

    args = [a for i, a in enumerate(argv) if not a.startswith("--devices") and not (i > 0 and argv[i - 1] == "--devices")]
    named = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                  if (a == "--out" and i + 1 < len(args)) or a.startswith("--out=")), None)
    run, env = api.launch_plan(devices, device, named)
    if named is None:
        args += ["--out", str(run)]
    os.environ.update(env)  # each process follows the free cores within its share
    out_at = args.index("--out") + 1 if "--out" in args else None
    # torchrun's --signals-to-handle (newer torch): it passes these on to the processes, which save and stop;
    # SIGUSR1 is what Slurm's --signal sends ahead of a job's time limit
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    os.environ.setdefault(STARTED_ENV, repr(process_started()))  # --max-time counts from this command's start
    try:
        torchrun(["--standalone", f"--nproc-per-node={devices}", "-m", "diffuse_cli", *args])
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        raise Interrupted(f"stopped by {name}: each process was asked to save and stop") from None
    except ChildFailedError as e:
        rank, failure = next(iter(e.failures.items()), (0, None))
        code = getattr(failure, "exitcode", 1)
        where = f" --out {args[out_at]}" if out_at else ""
        raise TrainingFailed(f"training process {rank} of {devices} failed (exit code {code}); the others were "
                             f"stopped. Resume with: diffuse train --resume auto{where} --devices {devices}") from None
