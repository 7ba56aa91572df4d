"""Data parallelism on the CPU with gloo: two processes agree with one, and resume across sizes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import diffuse_cli.images.data
from diffuse_cli.training import distributed
from diffuse_cli.formats.checkpoint import load_model
from diffuse_cli.config import Config, TrainConfig
from diffuse_cli.presets import model_config
from diffuse_cli.images.data import load_builtin, load_folder
from diffuse_cli.cli.launch import launch_devices
from diffuse_cli.network.threads import SHARE_ENV
from diffuse_cli.training.loop import Hooks, Options, train

from .conftest import write_image

# dropout 0: its masks are drawn per process, so only then are 1 and 2 processes comparable.
CONFIG = Config(preset="tiny", model=model_config("tiny", image_size=8),
                train=TrainConfig(batch_size=8, steps=4, warmup=1, precision="fp32"))
OPTIONS = Options(save_every=100, sample_every=100, grid_steps=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, run_dir, stop_at, resume, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    hooks = Hooks(should_stop=lambda step: step == stop_at)
    result = train(CONFIG, load_builtin(8, n=20), run_dir, replace(OPTIONS, resume=resume), hooks)
    weights = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(weights, os.path.join(out_dir, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def spawn(world, run_dir, out_dir, stop_at=-1, resume=False):
    mp.start_processes(worker, args=(world, free_port(), run_dir, stop_at, resume, str(out_dir)),
                       nprocs=world, start_method="spawn")


def close(a, b, atol=1e-4):
    # Reductions run in another order across 2 processes, and Adam's first steps (≈ lr·sign(g))
    # amplify float rounding where a gradient is near 0: measured max difference 3e-5 after 4
    # steps, while the weights moved by up to 3e-3.
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    single = train(CONFIG, load_builtin(8, n=20), tmp_path / "one", OPTIONS)
    spawn(2, tmp_path / "two", tmp_path)
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the ranks identical
    assert close(dict(single.model.state_dict()), r0)
    # The step moved the weights by far more than the tolerance, so the match is not trivial.
    initial = train(replace(CONFIG, train=replace(CONFIG.train, steps=1)), load_builtin(8, n=20), tmp_path / "x",
                    OPTIONS, Hooks(should_stop=lambda step: step == 0)).model.state_dict()
    assert not close(dict(initial), r0, atol=1e-3)
    _, _, info = load_model(tmp_path / "two" / "model.safetensors")
    assert info["world_size"] == 2 and info["step"] == 4


def test_resume_with_a_different_number_of_processes(tmp_path):
    torch.set_num_threads(1)
    straight = train(CONFIG, load_builtin(8, n=20), tmp_path / "straight", OPTIONS)
    spawn(2, tmp_path / "run", tmp_path, stop_at=2)
    resumed = train(CONFIG, load_builtin(8, n=20), tmp_path / "run", replace(OPTIONS, resume=True))
    assert resumed.step == 4
    assert close(dict(straight.ema.state_dict()), dict(resumed.ema.state_dict()))


def loaded(data) -> dict:
    """What load_folder found, as JSON-ready facts and a tensor."""
    return {"paths": [str(p) for p in data.paths], "skipped": [list(s) for s in data.skipped],
            "upscaled": data.upscaled, "channels": data.channels, "in_memory": data.images is not None}


def loading_worker(rank, world, port, root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    share = distributed.share(torch.device("cpu"))
    for on_demand in (False, True):
        if on_demand:
            diffuse_cli.images.data.memory_available = lambda: 0
        for name in ("mixed", "gray"):
            data = load_folder(os.path.join(root, name), 16, channels=None, share=share)
            key = f"{name}-{on_demand}-rank{rank}"
            with open(os.path.join(out_dir, key + ".json"), "w") as f:
                json.dump(loaded(data), f)
            if data.images is not None:
                save_file({"images": data.images}, os.path.join(out_dir, key + ".safetensors"))
    try:  # rank 1 sees one more file than rank 0
        load_folder(os.path.join(root, "gray" if rank == 0 else "mixed"), 16, share=share)
    except diffuse_cli.images.data.DataError as e:
        with open(os.path.join(out_dir, f"mismatch-rank{rank}.txt"), "w") as f:
            f.write(str(e))
    torch.distributed.destroy_process_group()


def test_processes_decode_a_share_each_and_end_with_the_same_set_as_one(tmp_path, image_folder, monkeypatch):
    """Each of 2 processes decodes every other file; both end with exactly what one process loads,
    skipped files (on both processes' shares), enlarged images and channels included."""
    (tmp_path / "mixed").symlink_to(image_folder)
    (image_folder / "c_bad.jpg").write_bytes(b"no jpeg")  # files 2 and 3, 5: bad ones on both shares
    for i in range(5):
        write_image(tmp_path / "gray" / f"{i}.png", "L", size=(16 + i, 20), seed=i)
    (tmp_path / "gray" / "zz.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(loading_worker, args=(2, free_port(), str(tmp_path), str(out)), nprocs=2, start_method="spawn")
    for on_demand in (False, True):
        if on_demand:
            monkeypatch.setattr(diffuse_cli.images.data, "memory_available", lambda: 0)
        for name in ("mixed", "gray"):
            one = load_folder(tmp_path / name, 16, channels=None, cache=False)  # as a DDP run reads it
            assert one.skipped and (one.images is None) == on_demand
            for rank in (0, 1):
                key = f"{name}-{on_demand}-rank{rank}"
                assert json.loads((out / f"{key}.json").read_text()) == json.loads(json.dumps(loaded(one))), key
                if not on_demand:
                    assert torch.equal(load_file(out / f"{key}.safetensors")["images"], one.images), key
    assert json.loads((out / "mixed-False-rank0.json").read_text())["upscaled"] == [14] * 7  # the 20x14 ones
    for rank in (0, 1):
        assert "the processes of this run see different files" in (out / f"mismatch-rank{rank}.txt").read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's standalone rendezvous")
def test_devices_flag_launches_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "diffuse_cli", "train", "--devices", "2", "--model", "tiny", "--image-size", "8",
           "--batch-size", "4", "--steps", "2", "--out", "run", "--precision", "fp32", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, _, info = load_model(tmp_path / "run" / "model.safetensors")
    assert info["world_size"] == 2 and info["step"] == 2


def torchrun_forwards_signals() -> bool:
    from torch.distributed.run import get_args_parser

    return any("--signals-to-handle" in a.option_strings for a in get_args_parser()._actions)


@pytest.mark.skipif(sys.platform != "linux" or not torchrun_forwards_signals(),
                    reason="torchrun's standalone rendezvous, and its --signals-to-handle (newer torch)")
def test_a_signal_to_the_devices_launcher_saves_and_stops_every_process(tmp_path, popen):
    """Ctrl-C or Slurm's SIGUSR1 reach torchrun, which passes them on: one line, exit 130, no traceback."""
    cmd = [sys.executable, "-m", "diffuse_cli", "train", "--devices", "2", "--model", "tiny", "--image-size", "8",
           "--batch-size", "4", "--steps", "100000", "--save-every", "1", "--out", "run", "--device", "cpu"]
    proc = popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "model.safetensors").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "training never saved"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "error: stopped by SIGUSR1: each process was asked to save and stop" in err
    assert "stopped at step" in err and "checkpoint saved" in err


@pytest.mark.parametrize("preset, expected", [(None, "4"), ("3", "3")])
def test_devices_on_the_cpu_share_the_cores(tmp_path, monkeypatch, preset, expected):
    """torchrun gives each process one thread unless OMP_NUM_THREADS says otherwise; ours split the cores."""
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr("torch.distributed.run.main", lambda args: seen.update(threads=os.environ["OMP_NUM_THREADS"]))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(sys, "argv", ["diffuse", "train", "--devices", "2", "--device", "cpu"])
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # so that what launch_devices sets is undone after the test
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")
    monkeypatch.setenv(SHARE_ENV, "0")  # so that the share launch_devices sets is undone after the test
    if preset is None:
        monkeypatch.delenv("OMP_NUM_THREADS")
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    monkeypatch.delenv(SHARE_ENV)
    launch_devices(2, "cpu", sys.argv[1:])
    assert seen["threads"] == expected
    assert os.environ.get(SHARE_ENV) == (expected if preset is None else None)  # each process follows the machine within it
