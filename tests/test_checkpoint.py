"""Checkpoints round-trip exactly, and every broken file is one clear CheckpointError."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffuse_cli.formats.checkpoint import (CheckpointError, load_model, load_training_state, read_metadata, save_model,
                                    save_training_state)
from diffuse_cli.config import Config, TrainConfig
from diffuse_cli.presets import model_config
from diffuse_cli.formats.files import MODEL_FILE, STATE_FILE, atomic_write_bytes
from diffuse_cli.training.step import make_optimizer
from diffuse_cli.network.unet import UNet

CONFIG = Config(preset="tiny", model=model_config("tiny", image_size=8))


def saved_model(tmp_path):
    torch.manual_seed(0)
    net = UNet(CONFIG.model)
    for p in net.parameters():  # zero-initialised layers too, so a round trip is a real check
        p.data.normal_()
    path = tmp_path / MODEL_FILE
    save_model(path, net, CONFIG, {"step": 7, "data": "x"})
    return net, path


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_get_the_umask_permissions_or_keep_their_own(tmp_path):
    """Not mkstemp's 0600: on a shared machine the team must be able to read checkpoints and PNGs."""
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.png", b"x")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.png").chmod(0o640)
        atomic_write_bytes(tmp_path / "new.png", b"y")  # replaced: its permissions stay
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.png", b"z")
        assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_model_round_trip_is_bit_exact(tmp_path):
    net, path = saved_model(tmp_path)
    loaded, config, info = load_model(path)
    assert config == CONFIG and info["step"] == 7
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_loading_a_class_conditional_model_loads_no_compiler(tmp_path):
    """The shape check builds the network on the meta device: with classes, its embedding's random draw there would
    run torch's Python reference and import torch._dynamo, seconds of every `diffuse sample`. A fresh process loads
    the checkpoint without it, and the embedding round-trips."""
    import subprocess
    import sys

    config = Config(preset="tiny", model=model_config("tiny", image_size=8, class_names=("a", "b")))
    torch.manual_seed(0)
    net = UNet(config.model)
    save_model(tmp_path / MODEL_FILE, net, config, {"step": 1})
    code = f"""
import sys
from diffuse_cli.formats.checkpoint import load_model
model, config, info = load_model({str(tmp_path / MODEL_FILE)!r})
print(model.class_emb.weight.sum().item(), "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == pytest.approx(net.class_emb.weight.sum().item(), rel=1e-6)
    assert out[1] == "False"


def test_header_is_read_without_tensors(tmp_path):
    _, path = saved_model(tmp_path)
    config, info = read_metadata(path)
    assert config.model.base_channels == 16 and info["data"] == "x"


def test_training_state_round_trip(tmp_path):
    net, ema = UNet(CONFIG.model), UNet(CONFIG.model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    save_training_state(tmp_path / STATE_FILE, net, ema, opt, CONFIG, {"step": 1})
    net2, ema2 = UNet(CONFIG.model), UNet(CONFIG.model)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=5.0)
    info = load_training_state(tmp_path / STATE_FILE, net2, ema2, opt2)
    assert info["step"] == 1 and opt2.param_groups[0]["lr"] == 1e-3
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert before.keys() == after.keys()
    for i in before:
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i]), i
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    with pytest.raises(CheckpointError, match=f"training-state.*the run's model is .*{MODEL_FILE}"):
        load_model(tmp_path / STATE_FILE)  # sampling from the wrong file of a run says which one to use


def test_resuming_keeps_this_machines_optimizer_kernel(tmp_path):
    net = UNet(CONFIG.model)
    saved = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=False)  # as a per-tensor-loop run saved it
    net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    saved.step()
    save_training_state(tmp_path / STATE_FILE, net, UNet(CONFIG.model), saved, CONFIG, {"step": 1})
    fresh = UNet(CONFIG.model)
    here = make_optimizer(fresh, TrainConfig())
    load_training_state(tmp_path / STATE_FILE, fresh, UNet(CONFIG.model), here)
    assert here.param_groups[0]["fused"] is True and here.param_groups[0]["lr"] == 1e-3


def test_resumed_optimizer_steps_like_an_unbroken_one_on_channels_last_weights(tmp_path):
    # Files hold contiguous moments; the fused AdamW kernel must not meet them beside
    # channels_last weights (it pairs elements by memory position).
    def make():
        torch.manual_seed(0)
        net = UNet(CONFIG.model).to(memory_format=torch.channels_last)
        for p in net.parameters():  # no zero-initialised layers: every weight gets a gradient
            p.data.normal_(0, 0.2)
        return net, make_optimizer(net, TrainConfig())

    def step(net, opt, seed):
        torch.manual_seed(seed)
        net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square().mean().backward()
        opt.step()
        opt.zero_grad()

    straight, opt = make()
    for seed in (1, 2):
        step(straight, opt, seed)
    first, opt1 = make()
    step(first, opt1, 1)
    save_training_state(tmp_path / STATE_FILE, first, UNet(CONFIG.model), opt1, CONFIG, {"step": 1})
    resumed, opt2 = make()
    load_training_state(tmp_path / STATE_FILE, resumed, UNet(CONFIG.model), opt2)
    step(resumed, opt2, 2)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def broken_files(tmp_path, good):
    data = good.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + header_len])
    yield "missing", tmp_path / "nope.safetensors", "no such file"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    yield "empty", tmp_path / "empty.safetensors", "empty or truncated"
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    yield "truncated", tmp_path / "trunc.safetensors", "truncated"
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 40)
    yield "random bytes", tmp_path / "random.safetensors", "not a safetensors file"
    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    yield "foreign", tmp_path / "foreign.safetensors", "another program"
    for name, change in (("newer", {"format_version": "99"}), ("badconfig", {"config": "{\"preset\": 3, \"zzz\": 1}"})):
        m = dict(meta)
        m["__metadata__"] = {**m["__metadata__"], **change}
        h = json.dumps(m).encode()
        (tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data[8 + header_len:])
        yield name, tmp_path / f"{name}.safetensors", {"newer": "upgrade diffuse", "badconfig": "config"}[name]
    other = UNet(model_config("tiny", image_size=8, channels=1))
    save_model(tmp_path / "mismatch.safetensors", other, CONFIG, {})
    yield "mismatch", tmp_path / "mismatch.safetensors", "do not match"
    diverged = UNet(CONFIG.model)
    diverged.conv_in.bias.data[0] = float("nan")
    save_model(tmp_path / "diverged.safetensors", diverged, CONFIG, {})
    yield "diverged", tmp_path / "diverged.safetensors", "NaN or infinity (e.g. conv_in.bias)"


def test_every_broken_checkpoint_is_a_clear_error(tmp_path):
    _, good = saved_model(tmp_path)
    seen = []
    for name, path, words in broken_files(tmp_path, good):
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert str(path) in str(info.value) and words in str(info.value), name
        seen.append(name)
    assert len(seen) == 9
