"""Hostile input: a corpus of nasty files made here, and bounded fuzzing of both loaders."""

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffuse_cli.formats.checkpoint import CheckpointError, load_model, read_metadata, save_model
from diffuse_cli.config import Config, model_config
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


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), cuts=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
       truncate=st.integers(0, 5000))
def test_fuzz_image_decoder_never_raises(tmp_path, seed, cuts, truncate):
    data = bytearray(seed[: max(1, truncate)] if truncate < len(seed) else seed)
    for pos, value in cuts:
        data[pos % len(data)] = value
    path = tmp_path / "fuzz.img"
    path.write_bytes(bytes(data))
    result = _try_decode(path, 8, 3)
    assert isinstance(result, str) or (result[0].shape == (3, 8, 8) and result[0].dtype == torch.uint8
                                       and result[1] >= 1)


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
