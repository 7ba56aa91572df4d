"""Mutations of every file diffuse reads, and the one rule each case must keep: the reader ends in a clean load or
a DiffuseError (the CLI's one line and exit 2), within a second and without an allocation the size a header
claims. Used by tests/test_fuzz.py (a fixed number of cases in CI) and benchmarks/fuzz.py (as many as asked).

The seed corpus is made, not stored: a tiny trained run (model.safetensors, training_state.safetensors), its
diffusers export (config.json, scheduler_config.json, diffuse_config.json and the weights), and a folder of images
whose entry in the image cache (its description and its images) is mutated: that must always load, with the
images a fresh decode gives, since a damaged entry is decoded again.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import diffuse_cli as diffuse
from diffuse_cli.errors import DiffuseError

SECONDS, GROWTH_MB = 1.0, 512  # a case's limits: its time, and how far it may raise this process's peak memory


def make_corpus(root: Path) -> dict[str, Path]:
    """The files to mutate, by role: a tiny run folder and its diffusers export."""
    from diffuse_cli.images.shapes import render_shapes

    run = root / "run"
    model = diffuse.train(render_shapes(8, 8), out=run, preset="tiny", steps=2, batch_size=4, device="cpu",
                          base_channels=32, head_channels=32, norm_group_min=1)  # channels diffusers can express
    diffuse.export_diffusers(model, root / "export")
    from diffuse_cli.images.pictures import save_png

    for i, image in enumerate(render_shapes(8, 8, seed=3)):
        save_png(image, root / "photos" / f"{i}.png")
    return {"model": run / "model.safetensors", "state": run / "training_state.safetensors",
            "data_cache": root / "photos",
            "unet_config": root / "export" / "unet" / "config.json",
            "unet_weights": root / "export" / "unet" / "diffusion_pytorch_model.safetensors",
            "scheduler": root / "export" / "scheduler" / "scheduler_config.json",
            "ours": root / "export" / "diffuse_config.json"}


# -- mutations: bytes -> bytes ------------------------------------------------------------------------------------

def _header_span(data: bytes) -> int:
    """Where a safetensors file's JSON header ends (8 + its length), or the file's length if that makes no sense."""
    if len(data) >= 8:
        n = struct.unpack("<Q", data[:8])[0]
        if 8 + n <= len(data):
            return 8 + n
    return len(data)


def flip_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    out, hi = bytearray(data), len(data) if hi is None else hi
    for _ in range(rng.choice((1, 1, 2, 8))):
        if hi > lo:
            out[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))] if data else data


def absurd_length(data: bytes, rng: random.Random) -> bytes:
    claim = rng.choice((0, 1, 7, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 - 1, len(data), len(data) - 7))
    return struct.pack("<Q", max(0, min(claim, 2 ** 64 - 1))) + data[8:]


EXTREMES = [0, -1, 1, 2 ** 31, 2 ** 53 + 1, 10 ** 30, -(10 ** 30), 1e308, -1e308, 0.5, "", "x" * 1000, None, [],
            {}, True, [1, 2], "F64", "I8", "BOOL", "nan"]


def _mutate_json_value(value, rng: random.Random, depth: int = 0):
    """One random edit somewhere inside a JSON value: a replaced, removed, duplicated or added entry."""
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.7:
        key = rng.choice(list(value))
        action = rng.random()
        if action < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if action < 0.25:
            return {**value, f"{key}_extra": rng.choice(EXTREMES)}
        return {**value, key: _mutate_json_value(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.7:
        i = rng.randrange(len(value))
        action = rng.random()
        if action < 0.2:
            return value[:i] + value[i + 1:]
        if action < 0.3:
            return value + [value[i]]
        return value[:i] + [_mutate_json_value(value[i], rng, depth + 1)] + value[i + 1:]
    if isinstance(value, str) and value.startswith("{") and rng.random() < 0.7:  # JSON inside a string (our config)
        try:
            return json.dumps(_mutate_json_value(json.loads(value), rng, depth + 1))
        except ValueError:
            pass
    return rng.choice(EXTREMES)


def deep_json(rng: random.Random) -> bytes:
    depth = rng.choice((100, 10_000, 200_000))
    return ("[" * depth + "]" * depth).encode() if rng.random() < 0.5 else ('{"a":' * depth + "1" + "}" * depth).encode()


def huge_json(rng: random.Random) -> bytes:
    return json.dumps({"k": "x" * rng.choice((10 ** 5, 10 ** 7))}).encode()


def mutate_json_text(text: bytes, rng: random.Random) -> bytes:
    try:
        value = json.loads(text)
    except ValueError:
        return flip_bytes(text, rng)
    out = json.dumps(_mutate_json_value(value, rng))
    if rng.random() < 0.1:  # a key twice: JSON allows it, and the last one wins
        out = out.replace("{", '{"_dup": 1, "_dup": 2, ', 1)
    return out.encode()


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    span, kind = _header_span(data), rng.choice(("header-bytes", "data-bytes", "truncate", "length", "header-json",
                                                   "header-json", "header-json", "tensor-missing", "tensor-twice"))
    if kind == "header-bytes":
        return kind, flip_bytes(data, rng, 8, span)
    if kind == "data-bytes":
        return kind, flip_bytes(data, rng, span)
    if kind == "truncate":
        return kind, truncate(data, rng)
    if kind == "length":
        return kind, absurd_length(data, rng)
    header = json.loads(data[8:span])
    names = [k for k in header if k != "__metadata__"]
    if kind == "tensor-missing" and names:
        header.pop(rng.choice(names))
    elif kind == "tensor-twice" and names:
        name = rng.choice(names)
        header[name + "_copy"] = dict(header[name])
    else:
        header = _mutate_json_value(header, rng)
    raw = json.dumps(header).encode()
    if kind == "tensor-twice" and rng.random() < 0.5:  # the same name twice, literally
        raw = raw.replace(f'"{name}_copy"'.encode(), f'"{name}"'.encode())
    return kind, struct.pack("<Q", len(raw)) + raw + data[span:]


def mutate(role: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutated version of a file of this role: (what was done, the bytes)."""
    if role in ("model", "state", "unet_weights"):
        return mutate_safetensors(data, rng)
    kind = rng.choice(("json", "json", "json", "bytes", "truncate", "deep", "huge"))
    if kind == "json":
        return kind, mutate_json_text(data, rng)
    if kind == "bytes":
        return kind, flip_bytes(data, rng)
    if kind == "truncate":
        return kind, truncate(data, rng)
    return kind, deep_json(rng) if kind == "deep" else huge_json(rng)


# -- readers: what a user's command does with each file -----------------------------------------------------------

def read_model(path: Path) -> torch.nn.Module:
    diffuse.inspect(path)
    return diffuse.load(path, "cpu").net


def read_state(path: Path) -> torch.nn.Module:
    """The EMA network of a training state."""
    from diffuse_cli.formats.checkpoint import load_training_state, read_metadata
    from diffuse_cli.network.unet import UNet

    config, _ = read_metadata(path, "diffuse/training-state")
    model, ema = UNet(config.model), UNet(config.model)
    load_training_state(path, model, ema, torch.optim.AdamW(model.parameters()))
    return ema


def read_diffusers(folder: Path) -> torch.nn.Module:
    return diffuse.import_diffusers(folder, device="cpu").net


@dataclass
class Outcome:
    role: str
    kind: str
    result: str  # "loaded", "refused" (a DiffuseError) or the name of any other exception: a bug
    seconds: float
    growth_mb: float
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result in ("loaded", "refused") and self.seconds < SECONDS and self.growth_mb < GROWTH_MB


def cache_case(folder: Path, rng: random.Random, work: Path) -> tuple[str, Callable[[], None]]:
    """A copy of the image folder with its cache entry built, then its description (or its images) mutated; the
    reader loads the folder through the cache and insists on the images a decode gives."""
    from diffuse_cli.images.data import load_folder

    shutil.copytree(folder, work / "photos")
    load_folder(work / "photos", 8, cache=work / "cache")  # builds the entry
    decoded = load_folder(work / "photos", 8, cache=False)  # in memory: the mapping above sees the file mutated
    entry = next((work / "cache").rglob("*.u8"))
    if rng.random() < 0.8:
        kind, data = mutate("data_cache", entry.with_suffix(".json").read_bytes(), rng)
        entry.with_suffix(".json").write_bytes(data)
    else:
        kind, data = "images", entry.read_bytes()
        entry.write_bytes(truncate(data, rng) if rng.random() < 0.5 else data + b"\0" * rng.randrange(1, 400))

    def read() -> None:
        again = load_folder(work / "photos", 8, cache=work / "cache")
        if not (torch.equal(again.images, decoded.images) and again.paths == decoded.paths
                and again.skipped == decoded.skipped and again.channels == decoded.channels):
            raise AssertionError("a damaged cache entry gave other images than decoding")
    return kind, read


def run_case(corpus: dict[str, Path], role: str, rng: random.Random, scratch: Path) -> Outcome:
    """Mutate one file of the corpus in a copy of its folder and read it as a command would."""
    if role == "data_cache":
        work = scratch / "case"
        shutil.rmtree(work, ignore_errors=True)
        kind, read = cache_case(corpus[role], rng, work)
        return _outcome(role, kind, read)
    source = corpus[role]
    export = role not in ("model", "state")
    base = source.parents[1] if role in ("unet_config", "unet_weights", "scheduler") else source.parent
    work = scratch / "case"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    target = work / source.relative_to(base)
    kind, data = mutate(role, source.read_bytes(), rng)
    target.write_bytes(data)
    read: Callable[[], None] = ((lambda: read_diffusers(work)) if export else
                                (lambda: read_model(target)) if role == "model" else (lambda: read_state(target)))
    return _outcome(role, kind, read)


def _outcome(role: str, kind: str, read: Callable[[], None]) -> Outcome:
    """Read, timed and its memory growth measured: what became of one case."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        read()
        result, message = "loaded", ""
    except DiffuseError as e:
        result, message = "refused", str(e)
    except RecursionError as e:  # deep JSON: a bug if it escapes
        result, message = "RecursionError", str(e)[:200]
    except Exception as e:  # noqa: BLE001 (the harness reports every other exception as a bug)
        result, message = type(e).__name__, str(e)[:200]
    seconds = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return Outcome(role, kind, result, seconds, growth, message)
