"""A fingerprint of what the engine computes, to hold a reshaping of the code to bit-identical outputs.

Through the public API only (so that the same script runs on the code before and after a change), on one thread
and the CPU: training on the built-in shapes (a conditional tiny model, then an unconditional one; every weight
of each), sampling with every sampler, a class and guidance, SDEdit, inpainting with RePaint's jumps, interpolation
between images and between seeds, and the time slider's frames. Prints one SHA-256 a result as JSON; two runs agree
line for line exactly when every output is bit-identical.

    python benchmarks/same_outputs.py > after.json
    git stash; python benchmarks/same_outputs.py > before.json; git stash pop; diff before.json after.json
    PYTHONPATH=path/to/an/old/checkout python benchmarks/same_outputs.py > before.json   # or an old checkout's code
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["DIFFUSE_DEVICE"] = "cpu"

import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

import diffuse_cli as diffuse  # noqa: E402


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def weights(model) -> str:
    state = model.net.state_dict()
    return digest(*(state[k] for k in sorted(state)))


def main() -> None:
    out: dict[str, str] = {}
    diffuse.set_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = diffuse.train(None, out=tmp / "run", preset="tiny", steps=30, batch_size=8, save_every=15,
                              sample_every=15)
        out["train: built-in shapes, conditional tiny, 30 steps"] = weights(model)
        out["train: its grid"] = hashlib.sha256((tmp / "run" / "samples" / "step_000030.png").read_bytes()).hexdigest()[:16]
        plain = diffuse.train(None, preset="tiny", steps=20, batch_size=8, classes="off", image_size=16)
        out["train: unconditional tiny, 20 steps, in memory"] = weights(plain)
        model = diffuse.load(tmp / "run")
        for sampler in ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "unipc", "heun"):
            out[f"sample: {sampler}, 6 steps, 5 images"] = digest(model.sample(5, sampler=sampler, steps=6, seed=3,
                                                                           batch_size=3))
        out["sample: default, classes circle and cross, guidance 2"] = digest(
            model.sample(3, steps=5, classes=("circle", "cross"), guidance=2.0))
        out["sample: unconditional model"] = digest(plain.sample(4, steps=5, seed=1))
        init = diffuse.noise(torch.full((3, 16, 16), 200, dtype=torch.uint8), 0)[0]
        out["edit: SDEdit at 0.6"] = digest(model.sample(2, init=init, strength=0.6, steps=8))
        mask = torch.zeros(16, 16, dtype=torch.bool)
        mask[4:12, 4:12] = True
        out["edit: inpainting, 2 jumps"] = digest(model.sample(2, init=init, mask=mask, steps=6))
        images = model.sample(2, steps=5, seed=9)
        for i, image in enumerate(images):  # PNG is lossless: any writer gives the interpolation the same pixels
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / f"{i}.png")
        out["interpolate: two images"] = digest(diffuse.interpolate(model, tmp / "0.png", tmp / "1.png", frames=4,
                                                                    steps=6))
        out["interpolate: two seeds, class square"] = digest(diffuse.interpolate(model, seeds=(1, 2), frames=3, steps=5,
                                                                                 class_name="square"))
        frames = diffuse.explore(model, images[0], frames=5, seed=2)
        out["explore: frames"] = digest(frames.forward, frames.walk, frames.walk_x0, frames.restored)
        frames = diffuse.explore(model, images[1], frames=4, seed=0, class_name="triangle", guidance=2.0)
        out["explore: frames, class triangle, guidance 2"] = digest(frames.forward, frames.walk, frames.walk_x0,
                                                                   frames.restored)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
