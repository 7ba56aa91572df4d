"""Which preset learns more in a time budget on this machine: the evidence for training/sizing.py's ENOUGH_STEPS.

For each budget and preset, `diffuse train --max-time BUDGET --model PRESET` on the built-in shapes (16x16), then
`diffuse eval RUN -n N` (FID, KID against the training images; the [eval] extra). Prints each run's steps and
scores, and which preset won each budget. Runs one after another, alone on the machine: a 10-minute pair with
its evaluations takes about half an hour on 2 CPU cores.

    pip install -e '.[eval]'
    python benchmarks/budget_presets.py                          # 3m and 10m, small and tiny
    python benchmarks/budget_presets.py --budgets 10m --presets small tiny --isa avx2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ISA_ENVIRONMENTS, machine_line, with_isa  # noqa: E402


def diffuse(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "diffuse_cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"diffuse {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["3m", "10m"])
    parser.add_argument("--presets", nargs="+", default=["small", "tiny"])
    parser.add_argument("--n", type=int, default=1000, help="samples each evaluation scores")
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENTS))
    args = parser.parse_args()
    with_isa(args.isa)
    print(machine_line("cpu") + "; the built-in shapes at 16x16", flush=True)
    print(f"{'budget':>7} {'preset':>8} {'steps':>7} {'FID':>8} {'KID':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            scores = {}
            for preset in args.presets:
                run = Path(tmp) / f"{preset}-{budget}"
                diffuse("train", "--max-time", budget, "--model", preset, "--out", str(run))
                found = json.loads(diffuse("eval", str(run), "-n", str(args.n), "--json", "--out", str(run / "ev"),
                                           "--copies", str(run / "copies.png")))
                steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
                scores[preset] = found["fid"]
                print(f"{budget:>7} {preset:>8} {steps:>7,} {found['fid']:>8.2f} {found['kid']['mean']:>8.4f}", flush=True)
            print(f"{budget:>7} the lower FID: {min(scores, key=scores.get)}", flush=True)


if __name__ == "__main__":
    main()
