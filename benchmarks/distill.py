"""Distillation measured: a teacher trained on the built-in shapes, students distilled from it to a few steps, and
FID/KID of each against the training images, beside the teacher at its default 25 steps and at the students' step
counts (the baseline a user would otherwise take), with each one's wall time for the samples.

    pip install -e '.[eval]'
    python benchmarks/distill.py                                       # tiny, 16 px, 3m teacher, 2m students: 4, 2
    python benchmarks/distill.py --preset small --teacher-time 10m --distill-time 5m --steps 4 2 1 --n 1000
    python benchmarks/distill.py --data photos --image-size 32 ...    # crops of photographs (photos.py)
    python benchmarks/distill.py --work study --progressive --lr 1e-4 --warmup 10   # students in rounds, kept
    python benchmarks/distill.py --work study --teacher study/teacher --lr 1e-3   # the same teacher, another recipe
    python benchmarks/distill.py --teacher study/teacher --teacher-steps 32 --steps 16 8 4 --progressive  # halving

With --progressive each student is distilled from the one before (4 steps from the teacher, 2 from the 4-step
student, ...), as Salimans & Ho halve the steps; otherwise each from the teacher. --work keeps the runs and the
samples, and appends each row to rows.jsonl there as it is measured; --teacher reuses a trained teacher run.

The samples are scored against the training images: the built-in shapes drawn afresh (`--n` of them), or the
folder of `--n` photograph crops the teacher trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from photos import crops  # noqa: E402

import diffuse_cli as diffuse  # noqa: E402
from diffuse_cli.images.shapes import render_shapes  # noqa: E402


def scored(model, folder: Path, reference: Path, n: int, **settings) -> tuple[float, float, float]:
    """(seconds for n samples, FID, KID) of the model's samples drawn with `settings`."""
    start = time.perf_counter()
    images = model.sample(n, batch_size=min(n, 256), **settings)
    seconds = time.perf_counter() - start
    diffuse.save_images(images, folder, grid=False)  # a grid.png would be scored as one more image
    s = diffuse.evaluate(folder, reference).scores
    return seconds, s.fid, s.kid_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["shapes", "photos"], default="shapes")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--teacher-time", default="3m")
    parser.add_argument("--distill-time", default="2m")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--n", type=int, default=500, help="samples each row scores and times")
    parser.add_argument("--progressive", action="store_true", help="each student from the one before")
    parser.add_argument("--teacher-steps", type=int, help="the teacher's DDIM steps the first student learns from "
                        "(default: distill's own, 16 in each student step; later rounds learn a student's own steps)")
    parser.add_argument("--lr", type=float, help="the students' learning rate (default: distill's own)")
    parser.add_argument("--warmup", type=int, help="the students' warm-up steps (default: distill's own)")
    parser.add_argument("--work", type=Path, help="keep runs, samples and rows.jsonl here (default: a temporary "
                        "folder)")
    parser.add_argument("--teacher", type=Path, help="a trained teacher run to distill instead of training one")
    args = parser.parse_args()
    print(machine_line("cpu"), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        recipe = {k: v for k, v in (("lr", args.lr), ("warmup", args.warmup)) if v is not None}
        tag = "".join(f"-{k}{v:g}" for k, v in recipe.items()) + ("-progressive" if args.progressive else "")
        reference = tmp / "reference"
        data = None  # the built-in shapes
        if args.data == "photos":
            data = reference = tmp / "photos"
            diffuse.save_images(crops(args.n, args.image_size), data, grid=False)  # no grid among the training images
        else:
            diffuse.save_images(render_shapes(args.n, args.image_size, seed=12345), reference, grid=False)
        rows: list[tuple] = []

        def row(name: str, count: int, model, folder: str, **settings) -> None:
            rows.append((name, count, *scored(model, tmp / folder, reference, args.n, **settings)))
            print(rows[-1], flush=True)
            with open(tmp / "rows.jsonl", "a") as f:
                f.write(json.dumps(dict(zip(("model", "steps", "seconds", "fid", "kid"), rows[-1]), n=args.n,
                                        data=args.data, image_size=args.image_size)) + "\n")

        teacher_run = args.teacher or tmp / "teacher"
        if args.teacher is None:
            start = time.perf_counter()
            trained = diffuse.train(data, out=teacher_run, preset=args.preset, image_size=args.image_size,
                                    max_time=args.teacher_time)
            print(f"teacher: {args.data}, {args.preset} at {args.image_size} px, {trained.training.step} steps in "
                  f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
        teacher = diffuse.load(teacher_run)
        if args.teacher is None:
            row("teacher, default sampler", 25, teacher, "t25")
        source = teacher_run
        for steps in args.steps:
            if args.teacher is None:
                row(f"teacher, default sampler at {steps}", steps, teacher, f"t{steps}", steps=steps)
            start = time.perf_counter()
            out = tmp / f"s{steps}{tag}"
            first = source == teacher_run  # a student's rounds learn its own steps
            student = diffuse.distill(source, out, steps=steps, max_time=args.distill_time, **recipe,
                                      teacher_steps=args.teacher_steps if first else None)
            minutes = (time.perf_counter() - start) / 60
            origin = f", from {source.name}" if args.progressive else ""
            row(f"student{tag} ({student.training.step} steps, {minutes:.1f} min{origin})", steps, student,
                f"{out.name}-samples")
            if args.progressive:
                source = out
    print(f"\n| model | steps | {args.n} samples, s | FID | KID |\n|---|---|---|---|---|")
    for name, steps, seconds, fid, kid in rows:
        print(f"| {name} | {steps} | {seconds:.1f} | {fid:.1f} | {kid:.4f} |")


if __name__ == "__main__":
    main()
