"""--hflip auto: the probe mirrors data that is its own mirror image, and not data with a handedness."""

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffuse_cli.training.mirror import ACCURACY_MIN, probe_mirroring
from diffuse_cli.images.shapes import render_shapes

from . import photos
from .glyphs import render_glyphs

from .conftest import assert_clean_error


def smooth_noise(n: int, size: int, seed: int) -> torch.Tensor:
    """Blobs of colour: random noise at 1/4 resolution, enlarged. (n, 3, size, size) float in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g) * 255
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def symmetric_objects(n: int = 2000, size: int = 32) -> torch.Tensor:
    """Every image is its own mirror image (a face-on vase, a building's front): the left half, mirrored."""
    x = smooth_noise(n, size, seed=1)
    return torch.cat([x[..., : size // 2], x[..., : size // 2].flip(-1)], -1).round().to(torch.uint8)


def stripes(n: int = 2000, size: int = 32, seed: int = 2) -> torch.Tensor:
    """Stripes at angles uniform in (-90°, 90°): no image is symmetric, but the set is its own mirror image."""
    g = torch.Generator().manual_seed(seed)
    angle = (torch.rand(n, generator=g) - 0.5) * math.pi
    period = 4 + 6 * torch.rand(n, generator=g)
    phase = torch.rand(n, generator=g) * 2 * math.pi
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    along = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]
    wave = 127.5 + 127.5 * torch.sin(2 * math.pi * along / period[:, None, None] + phase[:, None, None])
    return wave[:, None].expand(-1, 3, -1, -1).round().to(torch.uint8)


def skimage_crops(*args, **kwargs) -> torch.Tensor:
    pytest.importorskip("skimage")
    return photos.skimage_crops(*args, **kwargs)


@pytest.mark.parametrize("name, images", [
    ("the built-in shapes", lambda: render_shapes(3000, 16)),
    ("symmetric objects", symmetric_objects),
    ("mirror-symmetric textures", stripes),
    ("real photographs", lambda: skimage_crops(photos.PHOTOGRAPHS, 3000, (0.15, 0.6))),
    ("a handful of images", lambda: render_glyphs(12, 16)),  # too few to tell: mirrored, as before
])
def test_data_that_is_its_own_mirror_image_is_mirrored(name, images):
    verdict = probe_mirroring(images())
    assert verdict.mirror, (name, verdict)
    assert verdict.tested == 0 or abs(verdict.accuracy - 0.5) < 0.06, (name, verdict)


@pytest.mark.parametrize("name, images", [
    ("rendered characters", lambda: render_glyphs(3000, 32)),
    ("small rendered characters", lambda: render_glyphs(3000, 16, seed=1)),
    ("digits", lambda: render_glyphs(2000, 24, seed=2, chars="0123456789")),
    ("printed text", lambda: skimage_crops(photos.TEXT, 2000, (0.08, 0.25), flip=False)),
])
def test_data_with_a_handedness_is_not_mirrored(name, images):
    verdict = probe_mirroring(images())
    assert not verdict.mirror and verdict.accuracy >= ACCURACY_MIN, (name, verdict)
    assert "told held-out images from their mirror images" in verdict.reason()


def test_the_verdict_is_the_same_for_the_same_seed():
    images = render_glyphs(600, 16)
    assert probe_mirroring(images, seed=3) == probe_mirroring(images, seed=3)


def write_glyphs(folder: Path, n: int, size: int = 16) -> Path:
    for i, image in enumerate(render_glyphs(n, size)):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def test_train_says_what_it_decided_records_it_and_the_flags_override_it(run_cli, tmp_path, monkeypatch):
    from diffuse_cli.formats.checkpoint import read_metadata

    monkeypatch.chdir(tmp_path)
    write_glyphs(tmp_path / "letters", 800)
    args = ["letters", "--model", "tiny", "--image-size", "16", "--batch-size", "4", "--steps", "1"]
    auto = run_cli("train", *args, "--out", "auto")
    said = " ".join(auto.err.split())
    assert auto.code == 0 and "mirroring off: a probe told held-out images from their mirror images" in said, auto
    assert "--hflip on" in said
    assert read_metadata(tmp_path / "auto" / "model.safetensors")[0].train.hflip is False
    for flags, expected in ((["--hflip", "on"], True), (["--hflip"], True), (["--no-hflip"], False),
                            (["--hflip", "off"], False)):
        out = "run" + "".join(flags).replace("-", "_")
        result = run_cli("train", *args, *flags, "--out", out)
        assert result.code == 0 and "a probe told" not in result.err, (flags, result)
        assert read_metadata(tmp_path / out / "model.safetensors")[0].train.hflip is expected, flags
    assert_clean_error(run_cli("train", *args, "--hflip", "sometimes"), "unknown hflip 'sometimes'", "auto, on, off")
