"""How much of its speed `diffuse` keeps on a CPU that another program is using.

The default `diffuse train` (the built-in shapes) for a fixed time, and the default `diffuse sample` of a
checkpoint, each run as a user runs them (a fresh `python -m diffuse_cli` process), alone and then
beside each neighbour: a one-thread Python busy loop (a browser tab, an indexer), and a Python process
multiplying 1500x1500 torch matrices on 2 threads (a second experiment, a notebook). Training counts the
steps done within its --max-time (the budget starts after set-up); sampling reads the seconds `diffuse
sample` reports for its images. Each figure is printed beside its share of the alone figure; a fair
share of the cores is about 1/2 with one neighbour on two cores.

    python benchmarks/shared_cpu.py                          # train 40 s and sample 64 images, each neighbour
    python benchmarks/shared_cpu.py --only train --seconds 20
    python benchmarks/shared_cpu.py --source /tmp/old        # another checkout of diffuse (before/after)
    python benchmarks/shared_cpu.py --args "--threads 2"     # extra options for both commands
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEIGHBOURS = {
    "alone": None,
    "1-thread busy loop": "while True: pass",
    "2-thread matmul": "import torch\ntorch.set_num_threads(2)\na = torch.randn(1500, 1500)\nwhile True: a @ a",
}


def diffuse(source: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "diffuse_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800, check=True)


def beside(code: str | None):
    """A context in which the neighbour runs (None: nothing), ended however the measurement ends."""
    class Neighbour:
        def __enter__(self):
            self.proc = None if code is None else subprocess.Popen([sys.executable, "-c", code])
            time.sleep(0 if code is None else 2.0)  # past its start-up, at full load
            return self

        def __exit__(self, *exc):
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
    return Neighbour()


def train_steps(source: Path, seconds: int, extra: list[str], work: Path) -> float:
    """Steps a default `diffuse train --max-time` does in its time."""
    out = Path(tempfile.mkdtemp(dir=work))
    diffuse(source, "train", "--max-time", f"{seconds}s", "--out", str(out / "run"), *extra, cwd=work)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return float(records[-1]["step"])


def sample_rate(source: Path, checkpoint: Path, n: int, extra: list[str], work: Path) -> float:
    """Images a second of a default `diffuse sample -n N`, by the time it reports (model loading excluded)."""
    out = Path(tempfile.mkdtemp(dir=work))
    done = diffuse(source, "sample", "-n", str(n), "--checkpoint", str(checkpoint), "--out", str(out / "s"), *extra,
                   cwd=work)
    seconds = float(re.search(r"\(([\d.]+) s in all\)", done.stdout.replace("\n", " ")).group(1))
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["train", "sample"], nargs="*", default=["train", "sample"])
    parser.add_argument("--seconds", type=int, default=40, help="train's --max-time")
    parser.add_argument("-n", type=int, default=64, help="images to sample")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout of diffuse to run")
    parser.add_argument("--args", default="", help="extra options for train and sample, e.g. '--threads 2'")
    parser.add_argument("--neighbours", nargs="*", choices=list(NEIGHBOURS), default=list(NEIGHBOURS))
    args = parser.parse_args()
    extra = shlex.split(args.args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        checkpoint = None
        if "sample" in args.only:
            diffuse(args.source, "train", "--steps", "20", "--out", str(work / "ckpt"), cwd=work)
            checkpoint = work / "ckpt"
        for what in args.only:
            alone = None
            for name in args.neighbours:
                with beside(NEIGHBOURS[name]):
                    value = (train_steps(args.source, args.seconds, extra, work) if what == "train"
                             else sample_rate(args.source, checkpoint, args.n, extra, work))
                alone = value if name == "alone" else alone
                share = f"{value / alone:.0%}" if alone else "-"
                unit = f"steps in {args.seconds} s" if what == "train" else "images/s"
                rows.append((what, name, f"{value:.1f} {unit}", share))
                print(f"{what:<7}{name:<20}{value:>9.1f} {unit:<14}{share:>6}", flush=True)
    print(f"\n{args.source} {' '.join(extra)}\n| command | beside | figure | of alone |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
