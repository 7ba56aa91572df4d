"""kill -9 at a random moment of each command, N times, then what is left is checked: every file under its final
name whole (a checkpoint loads, a PNG decodes, a page ends), no folder that looks complete and is not, and the
same command run again succeeds (or finds its result already whole).

    python benchmarks/soak.py --trials 100          # train, sample, export, import, interpolate, explore, eval
    python benchmarks/soak.py --trials 20 --commands export import
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

TINY = ["--model", "tiny", "--image-size", "8", "--batch-size", "8"]


def diffuse(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffuse_cli", *map(str, args)]


def whole_png(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 (any failure is a torn file)
        return False


def loads(path: Path) -> bool:
    import diffuse_cli as d

    try:
        d.load(path, "cpu")
        return True
    except Exception:  # noqa: BLE001
        return False


def check(command: str, work: Path) -> str | None:
    """What is wrong with what a killed command left (None: nothing)."""
    if command == "train":
        run = work / "run"
        for name in ("model.safetensors", "training_state.safetensors"):
            if (run / name).exists() and name == "model.safetensors" and not loads(run / name):
                return f"{name} does not load"
        return None
    if command == "sample":
        torn = [p for p in (work / "s").glob("*.png") if not whole_png(p)] if (work / "s").exists() else []
        return f"torn PNGs: {torn[:3]}" if torn else None
    if command == "export":
        out = work / "e"
        if out.exists():
            import diffuse_cli as d

            try:
                d.import_diffusers(out, device="cpu")
            except Exception as e:  # noqa: BLE001
                return f"the export folder is there but does not load: {e}"
        return None
    if command == "import":
        model = work / "imp" / "model.safetensors"
        return "the imported model does not load" if model.exists() and not loads(model) else None
    if command == "interpolate":
        out = work / "i"
        if out.exists() and not (out / "strip.gif").exists():
            return "the interpolation folder is there without its strip.gif"
        return None
    if command == "explore":
        page = work / "explore.html"
        return "explore.html is not a whole page" if page.exists() and not page.read_text().rstrip().endswith(
            "</html>") else None
    if command == "eval":
        if (work / "copies.png").exists() and not whole_png(work / "copies.png"):
            return "copies.png is torn"
        from safetensors.torch import load_file

        for cached in (work / "cache").rglob("*.safetensors") if (work / "cache").exists() else []:
            try:
                load_file(cached)
            except Exception:  # noqa: BLE001
                return f"the cached features {cached.name} do not load"
        return None
    raise ValueError(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--commands", nargs="+",
                        default=["train", "sample", "export", "import", "interpolate", "explore", "eval"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        base.mkdir()
        import diffuse_cli as d

        model = d.train(None, out=base / "run", preset="tiny", image_size=8, batch_size=8, steps=20, device="cpu",
                        base_channels=32, head_channels=32, norm_group_min=1)  # channels diffusers can express
        d.export_diffusers(model, base / "exported")
        subprocess.run(diffuse("noise", base / "run" / "samples" / sorted(os.listdir(base / "run" / "samples"))[0],
                               "--t", "0", "--out", "photo.png"), cwd=base, env=env, check=True,
                       capture_output=True)
        subprocess.run(diffuse("sample", "-n", "24", "--steps", "5", "--checkpoint", "run", "--out", "pics"), cwd=base,
                       env=env, check=True, capture_output=True)
        commands = {
            "train": ["train", *TINY, "--steps", "200", "--save-every", "20", "--out", "run"],
            "sample": ["sample", "-n", "64", "--steps", "10", "--batch-size", "8", "--checkpoint", "run", "--out", "s"],
            "export": ["export", "run", "e"],
            "import": ["import", "exported", "--out", "imp"],
            "interpolate": ["interpolate", "--seeds", "1", "2", "--frames", "9", "--steps", "20", "--checkpoint", "run",
                            "--out", "i"],
            "explore": ["explore", "photo.png", "--checkpoint", "run", "--frames", "20"],
            # two small folders (the reference's features are cached), so a kill lands in every stage
            "eval": ["eval", "pics", "pics", "--cache-dir", "cache", "--copies", "copies.png"],
        }
        for command in args.commands:
            work = Path(scratch) / command
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work)
            if command == "train":
                shutil.rmtree(work / "run")
            start = time.perf_counter()
            subprocess.run(diffuse(*commands[command]), cwd=work, env=env, check=True, capture_output=True)
            full = time.perf_counter() - start
            good, problems = 0, []
            for trial in range(args.trials):
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(base, work)
                if command == "train":
                    shutil.rmtree(work / "run")
                proc = subprocess.Popen(diffuse(*commands[command]), cwd=work, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                time.sleep(rng.uniform(0, full))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                problem = check(command, work)
                if problem is None:
                    done = subprocess.run(diffuse(*commands[command], *(["--resume", "auto"] if command == "train"
                                                                         else [])),
                                          cwd=work, env=env, capture_output=True, text=True)
                    exists = "exists and is not an empty folder" in done.stderr or "already holds" in done.stderr
                    if done.returncode != 0 and not exists:
                        problem = f"the rerun failed: {done.stderr.strip().splitlines()[-1:]}"
                if problem is None:
                    good += 1
                else:
                    problems.append(problem)
            print(f"{command:<12} {good}/{args.trials} trials left a whole state that the rerun completed "
                  f"(a full run takes {full:.1f} s)" + (f"; e.g. {problems[0]}" if problems else ""), flush=True)


if __name__ == "__main__":
    main()
