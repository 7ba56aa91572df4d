"""Hostile input: a corpus of nasty files made here, and bounded fuzzing of both loaders."""

import io
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffuse_cli.formats.checkpoint import CheckpointError, load_model, read_metadata, save_model
from diffuse_cli.config import Config
from diffuse_cli.presets import model_config
from diffuse_cli.images.data import load_folder
from diffuse_cli.images.decode import _try_decode
from diffuse_cli.network.unet import UNet

from .conftest import write_bytes_png


def encoded(fmt: str, mode: str = "RGB", size=(12, 9), **kw) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (10, 10), i * 40) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


NASTY = {  # name: (bytes, decoded?)
    "zero.png": (b"", False),
    "truncated.jpg": (encoded("JPEG")[:200], False),
    "jpeg_named.png": (encoded("JPEG"), True),
    "text_named.jpg": (b"this is not an image\n" * 10, False),
    "tiny_1x1.png": (encoded("PNG", size=(1, 1)), True),
    "cmyk.jpg": (encoded("JPEG", "CMYK"), True),
    "animated.gif": (animated_gif(), True),
    "grayalpha.png": (encoded("PNG", "LA"), True),
    "binary.bmp": (encoded("BMP", "1"), True),
    "random.webp": (bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), False),
    "header_only.png": (write_bytes_png()[:33], False),
    "IMG_0001.HEIC": (b"\x00\x00\x00\x18ftypheic" + bytes(64), False),
}


def test_nasty_corpus(tmp_path, monkeypatch):
    for name, (data, _) in NASTY.items():
        (tmp_path / name).write_bytes(data)
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")  # 4096 px, over the limit set below
    os.symlink(tmp_path, tmp_path / "loop")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = load_folder(tmp_path, 8)
    kept = {p.name for p in data.paths}
    assert kept == {n for n, (_, ok) in NASTY.items() if ok}
    reasons = dict((os.path.basename(p), why) for p, why in data.skipped)
    assert "too large" in reasons["bomb.png"]
    assert reasons["text_named.jpg"] == "not an image"
    assert reasons["IMG_0001.HEIC"] == "HEIC is not supported; convert it to JPEG or PNG"
    assert set(reasons) == {n for n, (_, ok) in NASTY.items() if not ok} | {"bomb.png"}


SEEDS = [encoded("PNG"), encoded("JPEG"), animated_gif(), encoded("WEBP"), encoded("TIFF"), encoded("BMP")]


def test_fuzz_image_decoder_never_raises_and_refuses_what_it_cannot_read(tmp_path):
    """Mutated and truncated images of six formats: each decodes to a (3, 8, 8) uint8 image or is refused with a
    reason, never an exception; the unmutated seeds decode, a file cut to its first 8 bytes is refused, and of the
    mutated cases some are refused and some decoded (the mutations reach the decoders' checks)."""
    rng, results = random.Random(0), []
    for case in range(160):
        seed = SEEDS[case % len(SEEDS)]
        data = bytearray(seed if case < len(SEEDS) else seed[:8] if case < 2 * len(SEEDS)
                         else seed[:rng.randrange(1, len(seed) + 1)] if rng.random() < 0.3 else seed)
        for _ in range(0 if case < 2 * len(SEEDS) else rng.randrange(1, 9)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / "fuzz.img"
        path.write_bytes(bytes(data))
        result = _try_decode(path, 8, 3)
        assert isinstance(result, str) or (result[0].shape == (3, 8, 8) and result[0].dtype == torch.uint8
                                           and result[1] >= 1), result
        results.append(isinstance(result, str))
    assert not any(results[:len(SEEDS)]) and all(results[len(SEEDS):2 * len(SEEDS)])
    assert 0 < sum(results[2 * len(SEEDS):]) < len(results) - 2 * len(SEEDS)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "model.safetensors"
    save_model(path, UNet(model_config("tiny", image_size=8)), Config(preset="tiny", model=model_config("tiny", image_size=8)), {"step": 1})
    return path.read_bytes()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       truncate=st.one_of(st.none(), st.integers(0, 10**6)), header_only=st.booleans())
def test_fuzz_checkpoint_loader_raises_only_checkpoint_errors(tmp_path, checkpoint_bytes, cuts, truncate, header_only):
    data = bytearray(checkpoint_bytes)
    header_len = int.from_bytes(data[:8], "little") + 8
    for pos, value in cuts:
        data[pos % (header_len if header_only else len(data))] = value
    if truncate is not None:
        data = data[: truncate % len(data)]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(data))
    try:
        read_metadata(path)
        load_model(path)
    except CheckpointError as e:
        assert str(path) in str(e)
