"""Distillation measured: a teacher trained on the built-in shapes, students distilled from it to a few steps, and
FID/KID of each against the training images, beside the teacher at its default 25 steps and at the students' step
counts (the baseline a user would otherwise take), with each one's wall time for the samples.

    pip install -e '.[eval]'
    python benchmarks/distill.py                                       # tiny, 16 px, 3m teacher, 2m students: 4, 2
    python benchmarks/distill.py --preset small --teacher-time 10m --distill-time 5m --steps 4 2 1 --n 1000
    python benchmarks/distill.py --data photos --image-size 32 ...    # crops of photographs (photos.py)

The samples are scored against the training images: the built-in shapes drawn afresh (`--n` of them), or the
folder of `--n` photograph crops the teacher trained on.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    print(machine_line("cpu"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = tmp / "reference"
        data = None  # the built-in shapes
        if args.data == "photos":
            data = reference = tmp / "photos"
            diffuse.save_images(crops(args.n, args.image_size), data, grid=False)  # no grid among the training images
        else:
            diffuse.save_images(render_shapes(args.n, args.image_size, seed=12345), reference, grid=False)
        start = time.perf_counter()
        teacher = diffuse.train(data, out=tmp / "teacher", preset=args.preset, image_size=args.image_size,
                                max_time=args.teacher_time)
        print(f"teacher: {args.data}, {args.preset} at {args.image_size} px, {teacher.training.step} steps in "
              f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
        rows = [("teacher, default sampler", 25, *scored(teacher, tmp / "t25", reference, args.n))]
        for steps in args.steps:
            rows.append((f"teacher, default sampler at {steps}", steps,
                         *scored(teacher, tmp / f"t{steps}", reference, args.n, steps=steps)))
            start = time.perf_counter()
            student = diffuse.distill(tmp / "teacher", tmp / f"s{steps}", steps=steps, max_time=args.distill_time)
            minutes = (time.perf_counter() - start) / 60
            rows.append((f"student ({student.training.step} steps, {minutes:.1f} min)", steps,
                         *scored(student, tmp / f"s{steps}-samples", reference, args.n)))
            print(rows[-2], rows[-1], flush=True)
    print(f"\n| model | steps | {args.n} samples, s | FID | KID |\n|---|---|---|---|---|")
    for name, steps, seconds, fid, kid in rows:
        print(f"| {name} | {steps} | {seconds:.1f} | {fid:.1f} | {kid:.4f} |")


if __name__ == "__main__":
    main()
