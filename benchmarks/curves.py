"""FID against minutes: recipes trained by `diffuse train --max-time B` for each budget on each data set, each run
scored by `diffuse eval RUN -n N --json` (FID, KID, precision, recall against the images it trained on). Each
point is appended to a JSON-lines file as it is measured, so an interrupted study resumes where it stopped; the
curves are drawn into a PNG, one panel a data set.

    pip install -e '.[eval,bench]'
    python benchmarks/curves.py                                  # shapes, 2 5 10 20 minutes, default and edm
    python benchmarks/curves.py --data shapes photos --budgets 2m 5m 10m --recipes default edm --image-size 16
    python benchmarks/curves.py --data shapes photos --budgets 2m 5m --recipes default finetune --pretrain 5m
    python benchmarks/curves.py --data shapes photos --budgets 2m 5m 10m --recipes then default   # issue 50's ratio
    python benchmarks/curves.py --plot-only --results curves.jsonl --png docs/curves.png

The data sets: the built-in shapes, and crops of scikit-image's photographs (photos.py), written once as a folder.
The `then` recipe is the default of an earlier commit (`--then`, by default the one issues 47-51 were filed
against), run from a git worktree of it with this environment's packages, so that a change of default is measured
against what it replaced on the same machine the same day; every run is scored by today's `diffuse eval`, `then`
with the default sampler it had (dpm++3m-sde at 25 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

# Each recipe is the flags it adds to `diffuse train`: the default is today's, whatever it is.
RECIPES = {
    "default": [],
    "then": [],  # the default of the commit --then names, run from a worktree of it
    "edm": ["--objective", "edm"],
    "eps": ["--objective", "eps", "--min-snr-gamma", "0"],  # Ho et al.'s loss, for scale
    "batch16": ["--batch-size", "16"],  # twice the steps in the time, each of half the images
    "warmup20": ["--warmup", "20"],  # a fifth of the default's warm-up: a short run spends less of it ramping up
    "batch16-lr2e-3": ["--batch-size", "16", "--lr", "2e-3"],  # more steps, each larger
    "tiny": ["--model", "tiny"],  # the narrow network whatever the budget: about 3x the steps of `small`
    # the default started (`--from`) from the default trained --pretrain long on the other data set: its network
    # and schedule, so the budget does not choose the preset; the pre-training's minutes are not counted
    "finetune": [],
}
OTHER = {"shapes": "photos", "photos": "shapes"}
COLOURS = [(25, 70, 160), (210, 110, 20), (40, 150, 70), (170, 40, 130)]


def train(data: str, budget: str, run: Path, folders: dict[str, Path], flags: list[str],
          code: Path | None = None) -> float:
    """`diffuse train` of `data` for `budget` into `run` with `flags` (the checkout in `code` where given); the
    command's wall time in seconds. Exits with its error where it fails."""
    program, env = ["diffuse"], None
    if code is not None:
        program = [sys.executable, "-c", "from diffuse_cli.cli.app import main; main()"]
        env = {**os.environ, "PYTHONPATH": str(code)}
    command = [*program, "train", *([str(folders[data])] if data != "shapes" else []), "--max-time", budget,
               "--out", str(run), *flags]
    began = time.perf_counter()
    trained = subprocess.run(command, capture_output=True, text=True, env=env)
    if trained.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{trained.stderr[-2000:]}")
    return time.perf_counter() - began


@contextlib.contextmanager
def worktree(commit: str, root: Path) -> Iterator[tuple[Path, str]]:
    """A checkout of `commit` under `root` (a detached git worktree of this repository) and its full hash; the
    worktree is removed on leaving, however the study ends."""
    repo = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(root / "then"), sha], check=True,
                   capture_output=True)
    try:
        yield root / "then", sha
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(root / "then")])


def measure(data: str, budget: str, recipe: str, size: int, n: int, root: Path, folders: dict[str, Path],
            pretrain: str, then: tuple[Path, str] | None) -> dict:
    run, start, extra = root / f"{data}-{recipe}-{budget}", ["--image-size", str(size)], {}
    if recipe == "finetune":  # the pre-trained model is made once a study and read at its own size
        source = root / f"{OTHER[data]}-default-{pretrain}"
        if not (source / "model.safetensors").exists():
            train(OTHER[data], pretrain, source, folders, ["--image-size", str(size)])
        start, extra = ["--from", str(source)], {"pretrain": pretrain}
    code = None  # this environment's diffuse
    if recipe == "then":
        code, extra = then[0], {"commit": then[1][:7]}
    wall = train(data, budget, run, folders, start + RECIPES[recipe], code)
    import diffuse_cli as diffuse

    steps = diffuse.inspect(run)[0]["step"]
    # `then` is scored with its own default sampler, which every commit had until 2026-12-07: the default it was
    # is the one a user of it sampled with.
    sampler = ["--sampler", "dpm++3m-sde", "--steps", "25"] if recipe == "then" else []
    scores = json.loads(subprocess.run(["diffuse", "eval", str(run), "-n", str(n), "--json", *sampler,
                                        "--copies", str(run / "copies.png")], check=True,
                                       capture_output=True, text=True).stdout)
    return {"data": data, "budget": budget, "recipe": recipe, "image_size": size, "steps": steps, "n": n,
            "fid": scores["fid"], "kid_mean": scores["kid"]["mean"], "precision": scores["precision"],
            "recall": scores["recall"], "wall_s": round(wall, 1), **extra}


def minutes(budget: str) -> float:
    from diffuse_cli.api_settings import parse_duration

    return parse_duration(budget) / 60


def plot(points: list[dict], png: Path) -> None:
    """One panel a data set: FID (log scale) against minutes, one line a recipe."""
    import math

    from PIL import Image, ImageDraw

    from diffuse_cli.images.pictures import default_font
    from diffuse_cli.training.plots import label, log_ticks

    sets = sorted({p["data"] for p in points})
    first = list(dict.fromkeys(p["recipe"] for p in points))  # others (commits) in the file's order: fixed colours
    recipes = sorted(first, key=lambda r: (list(RECIPES).index(r) if r in RECIPES else len(RECIPES), first.index(r)))
    w, h, left, bottom, top = 420, 300, 60, 40, 28
    image = Image.new("RGB", (w * len(sets), h), "white")
    draw, font = ImageDraw.Draw(image), default_font(13)
    for k, data in enumerate(sets):
        mine = [p for p in points if p["data"] == data]
        xs, ys = [minutes(p["budget"]) for p in mine], [p["fid"] for p in mine]
        x_hi, y_lo, y_hi = max(xs) * 1.05, math.log(min(ys) * 0.9), math.log(max(ys) * 1.1)
        fx = lambda x: k * w + left + (w - left - 16) * x / x_hi  # noqa: E731
        fy = lambda y: top + (h - top - bottom) * (y_hi - math.log(y)) / (y_hi - y_lo)  # noqa: E731
        draw.text((k * w + left, 6), f"{data}: FID of {mine[0]['n']} samples", fill=(40, 40, 40), font=font)
        for x in sorted(set(xs)):
            draw.line([(fx(x), top), (fx(x), h - bottom)], fill=(230, 230, 230))
            draw.text((fx(x) - 8, h - bottom + 6), f"{x:g}m", fill=(40, 40, 40), font=font)
        for y in log_ticks(y_lo / math.log(10), y_hi / math.log(10)):  # round values, not the points' own: those crowd
            draw.text((k * w + 8, fy(y) - 7), label(y), fill=(40, 40, 40), font=font)
        for i, recipe in enumerate(recipes):
            line = sorted((minutes(p["budget"]), p["fid"]) for p in mine if p["recipe"] == recipe)
            colour = COLOURS[i % len(COLOURS)]
            if len(line) > 1:
                draw.line([(fx(x), fy(y)) for x, y in line], fill=colour, width=2)
            for x, y in line:
                draw.ellipse([fx(x) - 3, fy(y) - 3, fx(x) + 3, fy(y) + 3], fill=colour)
            draw.text((k * w + w - 110, top + 4 + 16 * i), recipe, fill=colour, font=font)
    png.parent.mkdir(parents=True, exist_ok=True)
    image.save(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["shapes"], choices=["shapes", "photos"])
    parser.add_argument("--budgets", nargs="+", default=["2m", "5m", "10m", "20m"])
    parser.add_argument("--recipes", nargs="+", default=["default", "edm"], choices=list(RECIPES))
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("-n", type=int, default=1000, help="samples each FID is of")
    parser.add_argument("--results", type=Path, default=Path("curves.jsonl"))
    parser.add_argument("--png", type=Path, default=Path("curves.png"))
    parser.add_argument("--pretrain", default="5m", help="the finetune recipe's training on the other data set")
    parser.add_argument("--then", default="1182672", help="the commit whose default the `then` recipe runs")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    done = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    if not args.plot_only:
        print(machine_line("cpu"), flush=True)
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            root, folders = Path(tmp), {}
            then = stack.enter_context(worktree(args.then, root)) if "then" in args.recipes else None
            if "photos" in args.data or "finetune" in args.recipes:
                import diffuse_cli as diffuse
                from photos import crops

                folders["photos"] = root / "photos"
                diffuse.save_images(crops(2000, args.image_size), folders["photos"], grid=False)
            for budget in args.budgets:  # each budget on every data set before the next: a study cut short
                for data in args.data:     # still has whole rows
                    for recipe in args.recipes:
                        pretrain = args.pretrain if recipe == "finetune" else None
                        commit = then[1][:7] if recipe == "then" else None
                        key = (data, budget, recipe, args.image_size, args.n, pretrain, commit)
                        if any((p["data"], p["budget"], p["recipe"], p["image_size"], p["n"], p.get("pretrain"),
                                p.get("commit")) == key for p in done):
                            continue
                        point = measure(data, budget, recipe, args.image_size, args.n, root, folders, args.pretrain,
                                        then)
                        print(json.dumps(point), flush=True)
                        done.append(point)
                        with args.results.open("a") as f:
                            f.write(json.dumps(point) + "\n")
    print("\n| data | budget | recipe | steps | FID | KID | precision | recall |\n|---|---|---|---|---|---|---|---|")
    for p in done:  # a point measured elsewhere may lack precision and recall: null
        pr = " | ".join("—" if p.get(k) is None else f"{p[k]:.3f}" for k in ("precision", "recall"))
        print(f"| {p['data']} | {p['budget']} | {p['recipe']} | {p['steps']} | {p['fid']:.1f} | {p['kid_mean']:.4f} "
              f"| {pr} |")
    if done:
        plot(done, args.png)
        print(f"curves: {args.png}")


if __name__ == "__main__":
    main()
