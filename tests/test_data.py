"""Image folders of every kind, the built-in dataset, and conversions."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from diffuse_cli.diffusion.pixels import to_model, to_uint8
from diffuse_cli.images.data import (BUILTIN, DataError, _close_gaps, _decode_all, find_files, load_builtin, load_data,
                                     load_folder)
from diffuse_cli.images.decode import TooLarge, decode_image, image_dimensions, read_image
from diffuse_cli.images.pictures import labelled_strip, make_grid

from .conftest import write_image


def test_folder_of_mixed_modes(image_folder):
    data = load_folder(image_folder, 8)
    assert len(data) == 9 and data.images.shape == (9, 3, 8, 8) and data.images.dtype == torch.uint8
    skipped = {os.path.basename(p): why for p, why in data.skipped}
    assert set(skipped) == {"broken.png", "notes.txt"}
    assert skipped["notes.txt"] == "not an image" and skipped["broken.png"].startswith("corrupt")


def test_decoding_a_window_at_a_time_keeps_the_order(image_folder):
    files = find_files(image_folder)
    one_go, windows = list(_decode_all(files, 8, 3)), list(_decode_all(files, 8, 3, window=2))
    assert [p for p, _ in windows] == files == [p for p, _ in one_go]
    for (_, a), (_, b) in zip(one_go, windows):
        assert a == b if isinstance(a, str) else torch.equal(a[0], b[0]) and a[1] == b[1]


def test_grayscale_training_converts_everything(image_folder):
    assert load_folder(image_folder, 8, channels=1).images.shape == (9, 1, 8, 8)


def test_channels_from_the_images(tmp_path, image_folder):
    gray = tmp_path / "gray"
    write_image(gray / "l.png", "L", seed=1)
    write_image(gray / "deep.png", "I;16", seed=2)
    rgb_gray = np.random.default_rng(3).integers(0, 255, (14, 20), dtype=np.uint8)
    Image.fromarray(np.stack([rgb_gray] * 3, -1)).save(gray / "scan.png")  # grayscale stored as RGB
    Image.fromarray(rgb_gray).convert("P").save(gray / "palette.gif")
    auto = load_folder(gray, 8, channels=None)
    assert auto.channels == 1 and auto.images.shape == (4, 1, 8, 8)
    assert torch.equal(auto.images, load_folder(gray, 8, channels=1).images)  # as decoding on demand would give

    write_image(gray / "colour.png", "RGB", seed=4)  # one colour image keeps them all in colour
    assert load_folder(gray, 8, channels=None).images.shape == (5, 3, 8, 8)
    assert load_folder(image_folder, 8, channels=None).channels == 3
    assert load_data(None, 8, channels=None).channels == 3  # the built-in shapes are in colour


def test_a_set_too_large_for_memory_is_decoded_on_demand(tmp_path, image_folder, monkeypatch):
    gray = tmp_path / "gray"
    write_image(gray / "l.png", "L", seed=1)
    write_image(gray / "deep.png", "I;16", seed=2)
    (gray / "broken.png").write_bytes(b"\x89PNG\r\n")
    in_memory = {root: load_folder(root, 8, channels=None, cache=False) for root in (image_folder, gray)}
    monkeypatch.setattr("diffuse_cli.images.data.memory_available", lambda: 5000)  # 11 files of 3x8x8 need 2,112 bytes
    assert load_folder(image_folder, 8, cache=False).images is not None
    assert load_folder(image_folder, 8, copies=2, cache=False).images is None  # two processes on the machine need 4,224
    monkeypatch.setattr("diffuse_cli.images.data.memory_available", lambda: 1000)
    for root, kept in in_memory.items():
        lazy = load_folder(root, 8, channels=None, cache=False)
        assert lazy.images is None and lazy.channels == kept.channels and len(lazy) == len(kept)
        assert lazy.skipped == kept.skipped and lazy.paths == kept.paths
        every = torch.arange(len(kept))
        assert torch.equal(lazy.batch(every), kept.images) and torch.equal(kept.batch(every), kept.images)
    lazy = load_folder(gray, 8, channels=None, cache=False)
    (gray / "l.png").write_bytes(b"not a png any more")  # changed during training
    with pytest.raises(DataError, match="l.png: not an image; it decoded when training started"):
        lazy.batch(torch.arange(len(lazy)))


class TorchCalls(TorchFunctionMode):
    """Records the torch functions and tensor methods called on this thread while it is entered."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_batch_is_gathered_without_a_torch_operator(tmp_path, image_folder, monkeypatch):
    # The read-ahead thread gathers the next step's batch; a torch operator there starts an OpenMP team of that
    # thread's own whose idle threads spin on the step's cores. So a batch, mapped, in memory or decoded on demand,
    # is gathered and stacked by numpy, and is what indexing the images gives.
    load_folder(image_folder, 8, cache=tmp_path / "cache")
    mapped = load_folder(image_folder, 8, cache=tmp_path / "cache")  # the second run maps the entry
    kept = load_folder(image_folder, 8, cache=False)
    monkeypatch.setattr("diffuse_cli.images.data.memory_available", lambda: 1000)
    lazy = load_folder(image_folder, 8, cache=False)
    assert mapped.mapped and kept.images is not None and lazy.images is None
    picks = torch.tensor([3, 0, 3, len(kept) - 1])
    for data in (mapped, kept, lazy):
        with TorchCalls() as calls:
            got = data.batch(picks)
        assert calls.names <= {"numpy", "tolist"}, calls.names
        assert got.dtype == torch.uint8 and torch.equal(got, kept.images[picks])


@pytest.mark.parametrize("chunk", [1, 2, 3, 4096])
def test_closing_the_gaps_of_skipped_files_keeps_the_order(chunk):
    rng = np.random.default_rng(chunk)
    for _ in range(20):
        images = torch.arange(12).repeat_interleave(3).view(12, 3, 1, 1).to(torch.uint8)
        kept = torch.from_numpy(np.flatnonzero(rng.random(12) < 0.6))
        expected = images[kept].clone()
        _close_gaps(images, kept, chunk)
        assert torch.equal(images[:len(kept)], expected), (kept, chunk)


def test_resize_short_side_and_centre_crop(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # a white band in the middle 20 columns: exactly the centre crop
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 10)
    assert out.shape == (3, 10, 10) and out.float().mean() > 240


def test_images_smaller_than_the_training_size_are_counted(tmp_path):
    Image.new("RGB", (12, 8)).save(tmp_path / "small.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "large.png")
    Image.new("RGB", (200, 100)).save(tmp_path / "photo.jpg")  # decoded at a reduced scale, still not below 16
    assert load_folder(tmp_path, 16).upscaled == [8]
    assert sorted(load_folder(tmp_path, 64).upscaled) == [8, 40]


def test_pixel_limit_counts_the_pixels_a_jpeg_decodes(tmp_path, monkeypatch):
    """A phone's 108- or 200-megapixel JPEG decodes at 1/8 scale for training; the same PNG is refused."""
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "huge.jpg")  # over twice the limit: PIL refuses to open
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "large.jpg")  # between the limit and twice it
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 12x8 and 5x5 (1/8 scale) are well under it
    data = load_folder(tmp_path, 4)
    assert [p.name for p in data.paths] == ["huge.jpg", "large.jpg"] and data.images[:, 0].float().mean() > 150
    assert data.skipped == [(str(tmp_path / "huge.png"), "too large: over twice PIL's limit of 1,000 pixels")]
    for name, size in (("huge.jpg", "96x64"), ("large.jpg", "40x40")):
        with pytest.raises(TooLarge, match=f"{size}, over PIL's limit of 1,000 pixels"):
            read_image(tmp_path / name)  # at its own size nothing is reduced


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), "black")
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed: the white half ends on top
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rot.jpg", 20).float()
    assert out[:, :5].mean() > 200 and out[:, -5:].mean() < 50
    assert image_dimensions(tmp_path / "rot.jpg") == (20, 40)  # as shown, from the header alone
    shrunk = read_image(tmp_path / "rot.jpg", max_side=10).float()  # the long side to 10, the aspect kept
    assert shrunk.shape == (3, 10, 5) and shrunk[:, :3].mean() > 200 and shrunk[:, -3:].mean() < 50
    assert read_image(tmp_path / "rot.jpg", max_side=64).shape == (3, 40, 20)  # never enlarged


def test_sixteen_bit_keeps_its_range(tmp_path):
    im = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert im.mode == "I;16"
    im.save(tmp_path / "white16.png")
    assert decode_image(tmp_path / "white16.png", 8).min() == 255


def test_transparency_goes_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert decode_image(tmp_path / "clear.png", 8).min() == 255


def test_empty_and_useless_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        load_folder(tmp_path / "empty", 8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"1 file, none of them a readable image \(a.jpg: not an image\)"):
        load_folder(tmp_path / "junk", 8)
    with pytest.raises(DataError, match="no such file"):
        load_folder(tmp_path / "missing", 8)


def test_symlink_loops_do_not_hang(tmp_path):
    root = tmp_path / "loop"
    write_image(root / "a" / "x.png")
    os.symlink(root, root / "a" / "back")
    files = find_files(root)
    assert [f.name for f in files] == ["x.png"]


def test_builtin_dataset_is_deterministic_and_varied():
    a, b = load_builtin(16, n=64), load_builtin(16, n=64)
    assert a.images.shape == (64, 3, 16, 16) and len(load_data(BUILTIN, 16)) == 8192
    assert torch.equal(a.images, b.images)
    assert a.images.float().std(0).mean() > 30  # the images differ from each other
    assert load_builtin(16, channels=1, n=4).images.shape == (4, 1, 16, 16)


def test_pixel_conversions_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert to_model(x).min() == -1 and to_model(x).max() == 1
    assert torch.equal(to_uint8(to_model(x)), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_grids_and_strips():
    imgs = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    assert make_grid(imgs, padding=1).shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    strip = labelled_strip([imgs[0]] * 3, ["a", "b", "c"])
    assert strip.shape[0] == 3 and strip.shape[2] > 3 * 4


def test_the_built_in_squares_are_squares_and_the_triangles_stand_on_their_base():
    """The built-in shapes are upright: a square fills the box around it (a diamond fills half), and a triangle
    has more of itself below its middle row than above it (one pointing down has less)."""
    from diffuse_cli.images.shapes import SHAPES, render_shapes, shape_kinds

    images, kinds = render_shapes(200, 64, seed=3).float(), shape_kinds(200, seed=3)
    for image, kind in zip(images, kinds.tolist()):
        figure = (image - image[:, :1, :1]).abs().sum(0) > 60  # differs from the corner's ground
        rows, cols = figure.any(1).nonzero().flatten(), figure.any(0).nonzero().flatten()
        box = figure[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        if SHAPES[kind] == "square":
            assert box.float().mean() > 0.7  # tilted by at most 9 degrees: 0.76; a diamond: 0.5 to 0.6
        if SHAPES[kind] == "triangle":
            half = len(box) // 2
            assert box[half:].sum() > 1.5 * box[:half].sum()
