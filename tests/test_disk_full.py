"""A full disk, at every write: the command stops with one line naming the file and the space it needed (exit 1),
what was there before stays loadable, and no temporary file is left. Every file diffuse writes goes through
formats/files.atomic_write_bytes, so the error is injected there, at the 1st, 2nd, ... write of each command;
and, where this machine lets a test mount a small tmpfs (root on Linux), for real. CPU, float32."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffuse_cli as diffuse
from diffuse_cli.formats import files

TINY = ["--model", "tiny", "--image-size", "8", "--batch-size", "4"]
REAL_WRITE = files._write


class FullAfter:
    """files._write that succeeds `allowed` times, then fails as a full disk does; counts the writes it saw."""

    def __init__(self, allowed: int):
        self.allowed, self.calls = allowed, 0

    def __call__(self, f, data: bytes) -> None:
        self.calls += 1
        if self.calls > self.allowed:
            f.write(data[:len(data) // 2])  # a partial file, as a disk filling up leaves one
            raise OSError(errno.ENOSPC, "No space left on device")
        REAL_WRITE(f, data)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def writes_of(run_cli, monkeypatch, args: list[str]) -> int:
    """How many files a command writes (it must succeed with the disk never full)."""
    counter = FullAfter(10 ** 9)
    monkeypatch.setattr(files, "_write", counter)
    result = run_cli(*args)
    assert result.code == 0, result
    monkeypatch.setattr(files, "_write", REAL_WRITE)
    return counter.calls


def test_training_that_cannot_save_stops_in_one_line_and_its_last_checkpoint_loads(tmp_path, image_folder, run_cli,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the run's own files only: the image cache's, whose failure is no reason to stop, are test_data_cache.py's
    args = ["train", image_folder, *TINY, "--steps", "6", "--save-every", "2", "--sample-every", "3", "--no-cache"]
    total = writes_of(run_cli, monkeypatch, args + ["--out", "probe"])
    assert total >= 10  # states, models, metrics, grids, loss.png: each site gets its turn below
    for allowed in range(total):
        run = tmp_path / f"run{allowed}"
        monkeypatch.setattr(files, "_write", FullAfter(allowed))
        result = run_cli(*args, "--out", run)
        assert result.code == 1, (allowed, result)
        lines = result.err.strip().splitlines()
        assert "Traceback" not in result.err and "could not write" in lines[-1] and "No space left" in lines[-1]
        assert "needs" in lines[-1] and "free there" in lines[-1] and str(run) in lines[-1], lines[-1]
        assert not temporaries(tmp_path), (allowed, temporaries(tmp_path))
        monkeypatch.setattr(files, "_write", REAL_WRITE)
        if (run / "model.safetensors").exists():
            diffuse.load(run, "cpu")  # the last good checkpoint
        if (run / "training_state.safetensors").exists():
            assert run_cli("train", "--resume", run, "--steps", "8").code == 0, allowed  # and resumes


@pytest.mark.parametrize("command", ["sample", "export", "explore", "interpolate", "noise", "import"])
def test_every_command_that_writes_stops_in_one_line_on_a_full_disk(command, tmp_path, image_folder, run_cli,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    diffuse.train(image_folder, out="run", preset="tiny", image_size=8, batch_size=4, steps=2, device="cpu",
                  base_channels=32, head_channels=32, norm_group_min=1)  # channels diffusers can express: exportable
    photo = next(p for p in sorted(Path(image_folder).rglob("*.png")) if "broken" not in p.name)
    assert run_cli("export", "run", "exported").code == 0
    args = {"sample": ["sample", "-n", "5", "--steps", "2", "--checkpoint", "run", "--out", "s"],
            "export": ["export", "run", "e"], "explore": ["explore", photo, "--checkpoint", "run", "--frames", "3"],
            "interpolate": ["interpolate", "--seeds", "1", "2", "--frames", "3", "--steps", "2", "--checkpoint", "run",
                            "--out", "i"],
            "noise": ["noise", photo, "--t", "10", "--out", "n.png"], "import": ["import", "exported", "--out", "imp"]}
    total = writes_of(run_cli, monkeypatch, args[command])
    for allowed in sorted({0, total // 2, total - 1}):
        for leftover in ("s", "e", "i", "imp", "explore.html", "n.png"):
            subprocess.run(["rm", "-rf", str(tmp_path / leftover)], check=True)
        monkeypatch.setattr(files, "_write", FullAfter(allowed))
        result = run_cli(*args[command])
        monkeypatch.setattr(files, "_write", REAL_WRITE)
        last = result.err.strip().splitlines()[-1]
        assert result.code == 1 and "Traceback" not in result.err, (allowed, result)
        assert last.startswith("error: could not write") and "No space left on device" in last, (allowed, last)
        assert not temporaries(tmp_path), temporaries(tmp_path)


def can_mount() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and subprocess.run(["which", "mount"],
                                                                            capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root on Linux")
def test_a_real_full_disk_stops_training_in_one_line(tmp_path, image_folder):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let a test mount a tmpfs")
    try:
        result = subprocess.run([sys.executable, "-m", "diffuse_cli", "train", image_folder, *TINY, "--steps", "4",
                                 "--out", disk / "run"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and "could not write" in last and "Traceback" not in result.stderr
        assert not temporaries(disk)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
