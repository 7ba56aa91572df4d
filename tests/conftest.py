"""Shared fixtures: tiny image folders made on the fly, and an in-process CLI runner."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Every test runs torch on one CPU thread, in this process and in the ones it starts (OMP_NUM_THREADS fixes the
# count: threads.share). Results depend on the thread count through rounding, so a test that compares two runs
# means the same on every machine, and none slows to a crawl beside a busy neighbour. test_threads.py checks the
# automatic count on machine readings it injects. Set before torch is imported, whose OpenMP reads it then, and
# set in torch too, in case a plugin imported it first: else a serial run used every core of the machine until
# the first CLI test set one thread, so a test's rounding depended on the machine and on the tests before it.
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffuse_cli.cli import app as cli  # noqa: E402
from diffuse_cli.network.device import DEVICE_ENV  # noqa: E402

torch.set_num_threads(1)

# Decoded images and reference features are cached in a folder of the test session's own, never the user's.
os.environ["DIFFUSE_CACHE"] = tempfile.mkdtemp(prefix="diffuse-test-cache-")


# Every test states its device. Unmarked, it runs on the CPU: the tool's automatic choice ('auto', the API's
# device=None) is the CPU through $DIFFUSE_DEVICE, in this process and in every process the test starts, so a
# test means the same with or without a GPU beside it. A test of a GPU path is marked `cuda`: it runs on CUDA,
# is skipped where there is none, and gets fp32 as fp32 (TF32 off) unless it sets otherwise itself.
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a test of a GPU path; runs on CUDA, skipped where there is none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="a GPU path: needs CUDA"))


def global_state() -> dict:
    """What one test could set in torch or the process and leave for the next, which on another machine or in
    another order (pytest -n) would run after a different test."""
    state = dict(dtype=torch.get_default_dtype(), grad=torch.is_grad_enabled(),
                 deterministic=torch.are_deterministic_algorithms_enabled(),
                 matmul=torch.get_float32_matmul_precision(), cudnn_tf32=torch.backends.cudnn.allow_tf32,
                 cuda_tf32=torch.backends.cuda.matmul.allow_tf32, benchmark=torch.backends.cudnn.benchmark,
                 threads=torch.get_num_threads())
    if hasattr(torch, "get_default_device"):
        state["device"] = torch.get_default_device()
    # and the process's signal handlers: a handler left by a run would swallow the next test's (or pytest's) signals
    state["signals"] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None))
                        if s is not None}
    return state


@pytest.fixture(autouse=True)
def stated_device(request, monkeypatch):
    if request.node.get_closest_marker("cuda"):
        monkeypatch.delenv(DEVICE_ENV, raising=False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        monkeypatch.setenv(DEVICE_ENV, "cpu")
    before = global_state()
    yield
    after = global_state()
    assert after == before, f"the test left global state changed: {before} -> {after}"


def write_image(path: Path, mode: str = "RGB", size=(20, 14), fmt: str | None = None, seed: int = 0) -> Path:
    """A random image in the given PIL mode, saved in `fmt` (default: from the suffix)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))  # mode I;16
    else:
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
        if mode == "P":
            im = im.quantize(16)
        elif mode != "RGB":
            im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


@pytest.fixture
def popen():
    """subprocess.Popen, in a session of its own that the test's teardown kills, pass or fail, with every process
    it started (torchrun's workers too): no test leaves a process running."""
    started: list[subprocess.Popen] = []

    def start(cmd, **kwargs) -> subprocess.Popen:
        started.append(subprocess.Popen(cmd, start_new_session=True, **kwargs))
        return started[-1]
    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it and everything it started have ended
            pass
        proc.communicate()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Mixed modes and formats, nested, plus one corrupt file and one text file."""
    root = tmp_path / "images"
    write_image(root / "rgb.png", "RGB")
    write_image(root / "gray.jpg", "L", size=(16, 24))
    write_image(root / "alpha.png", "RGBA")
    write_image(root / "palette.gif", "P")
    write_image(root / "sub" / "deep16.png", "I;16")
    write_image(root / "sub" / "cmyk.jpg", "CMYK")
    write_image(root / "sub" / "photo.webp", "RGB", size=(30, 30))
    write_image(root / "sub" / "scan.tiff", "RGB")
    write_image(root / "bitmap.bmp", "RGB")
    (root / "broken.png").write_bytes(write_bytes_png()[:60])
    (root / "notes.txt").write_text("not an image")
    return root


def write_bytes_png(size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[-500:]!r}, err={self.err[-500:]!r})"


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `diffuse ARGS` in this process through main(), as a user would; returns code, stdout, stderr."""
    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["diffuse", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


def assert_clean_error(result: Result, *words: str) -> None:
    """A non-zero exit, an 'error:' line naming the problem, and no traceback."""
    assert result.code != 0, result
    assert "Traceback" not in result.err + result.out, result
    assert "error:" in result.err, result
    for word in words:
        assert word.lower() in result.err.lower(), (word, result)
