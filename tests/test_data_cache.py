"""The decoded-image cache (images/cache.py): the same images as decoding, never stale, never in the way.
On the CPU; images are small PNGs written by the tests."""

import json
import os

import pytest
import torch

from diffuse_cli.images import cache as cache_module
from diffuse_cli.images.data import load_folder

from .conftest import write_image


@pytest.fixture
def folder(tmp_path):
    for i in range(6):
        write_image(tmp_path / "photos" / f"{i}.png", size=(20 + i, 14), seed=i)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    return tmp_path / "photos"


def test_the_first_run_builds_the_entry_and_the_next_reads_the_same_images_without_decoding(folder, tmp_path,
                                                                                             monkeypatch):
    plain = load_folder(folder, 8, cache=False)
    built = load_folder(folder, 8, cache=tmp_path / "cache")
    assert built.mapped and "cached in" in built.cache_note and torch.equal(built.images, plain.images)
    monkeypatch.setattr("diffuse_cli.images.data._try_decode", lambda *a: pytest.fail("decoded again"))
    read = load_folder(folder, 8, cache=tmp_path / "cache")
    assert read.mapped and "come from the cache" in read.cache_note and torch.equal(read.images, plain.images)
    assert (read.paths, read.skipped, read.upscaled, read.channels) == (plain.paths, plain.skipped, plain.upscaled,
                                                                          plain.channels)
    assert read.cache_note in read.notes(from_folder=True)


def test_an_entry_is_per_size_and_channels(folder, tmp_path):
    cache = tmp_path / "cache"
    sizes = {(s, c): load_folder(folder, s, channels=c, cache=cache).images.shape for s in (8, 16) for c in (1, 3)}
    assert sizes == {(s, c): (6, c, s, s) for s in (8, 16) for c in (1, 3)}
    assert len(list((cache / "data").glob("*.u8"))) == 4


@pytest.mark.parametrize("change", ["rewrite", "add", "remove", "touch"])
def test_a_changed_folder_is_decoded_again_never_read_stale(folder, tmp_path, change):
    cache = tmp_path / "cache"
    load_folder(folder, 8, cache=cache)
    if change == "rewrite":
        write_image(folder / "2.png", size=(22, 14), seed=99)
    elif change == "add":
        write_image(folder / "new.png", seed=7)
    elif change == "remove":
        (folder / "3.png").unlink()
    else:  # the same bytes, a new time: decoded again all the same (a time is all a cheap check can see)
        os.utime(folder / "1.png", ns=(1, 1))
    again = load_folder(folder, 8, cache=cache)
    assert "cached in" in again.cache_note  # built again, not read
    assert torch.equal(again.images, load_folder(folder, 8, cache=False).images)


@pytest.mark.parametrize("damage", ["truncate", "json", "no json"])
def test_a_damaged_entry_is_built_again(folder, tmp_path, damage):
    cache = tmp_path / "cache"
    load_folder(folder, 8, cache=cache)
    data_file = next((cache / "data").glob("*.u8"))
    if damage == "truncate":
        data_file.write_bytes(data_file.read_bytes()[:100])
    elif damage == "json":
        data_file.with_suffix(".json").write_text("{not json")
    else:
        data_file.with_suffix(".json").unlink()
    again = load_folder(folder, 8, cache=cache)
    assert "cached in" in again.cache_note and torch.equal(again.images, load_folder(folder, 8, cache=False).images)


def test_a_description_edited_into_other_valid_json_is_not_believed(folder, tmp_path):
    """Without the digest, swapped indices or other short sides would load as other images or other warnings."""
    cache = tmp_path / "cache"
    load_folder(folder, 8, cache=cache)
    description = next((cache / "data").glob("*.json"))
    meta = json.loads(description.read_text())
    meta["kept"] = meta["kept"][::-1]
    meta["short_side"] = [1] * len(meta["short_side"])
    description.write_text(json.dumps(meta))
    again = load_folder(folder, 8, cache=cache)
    plain = load_folder(folder, 8, cache=False)
    assert "cached in" in again.cache_note and again.paths == plain.paths and again.upscaled == plain.upscaled


def test_grayscale_found_through_the_cache_as_without_it(tmp_path):
    for i in range(3):
        write_image(tmp_path / "gray" / f"{i}.png", "L", seed=i)
    cached = load_folder(tmp_path / "gray", 8, channels=None, cache=tmp_path / "cache")
    again = load_folder(tmp_path / "gray", 8, channels=None, cache=tmp_path / "cache")
    plain = load_folder(tmp_path / "gray", 8, channels=None, cache=False)
    assert cached.channels == again.channels == plain.channels == 1
    assert torch.equal(again.images, plain.images)


def test_a_cache_that_cannot_be_written_is_said_once_and_the_images_are_decoded_as_before(folder, tmp_path):
    (tmp_path / "a file").write_text("")
    data = load_folder(folder, 8, cache=tmp_path / "a file" / "cache")
    assert not data.mapped and torch.equal(data.images, load_folder(folder, 8, cache=False).images)
    said = [n for n in data.notes(from_folder=True) if "not cached" in n]
    assert said == [data.cache_note] and "cannot be written" in data.cache_note


def test_a_cache_disk_without_room_is_not_filled(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10 << 20})())
    data = load_folder(folder, 8, cache=tmp_path / "cache")
    assert not data.mapped and "GB free" in data.cache_note and not list((tmp_path / "cache").rglob("*.u8"))


def test_a_full_disk_while_the_entry_is_written_leaves_no_entry_and_the_run_goes_on(folder, tmp_path, monkeypatch):
    import errno

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("diffuse_cli.formats.files._write", full)  # the entry's description, written last
    data = load_folder(folder, 8, cache=tmp_path / "cache")
    assert "could not be written" in data.cache_note and torch.equal(data.images, load_folder(folder, 8,
                                                                                               cache=False).images)
    assert not [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_folder_changed_while_it_is_read_trains_on_what_was_read_and_keeps_no_entry(folder, tmp_path):
    cache = tmp_path / "cache"
    plain = load_folder(folder, 8, cache=False)

    def change_midway(done, total):
        if done == 3:
            write_image(folder / "5.png", size=(30, 14), seed=50)  # a new time, new pixels
    data = load_folder(folder, 8, cache=cache, progress=change_midway)
    assert "changed while its images were read" in data.cache_note
    assert torch.equal(data.images[:5], plain.images[:5])  # as read; 5.png old or new, as the decoder threads met it
    assert not list(cache.rglob("*.json")) and not list(cache.rglob("*.u8")) and not list(cache.rglob("*.tmp"))
    assert "cached in" in load_folder(folder, 8, cache=cache).cache_note  # the next run reads it afresh


def test_a_file_removed_while_the_folder_is_read_keeps_no_entry_and_the_next_run_reads_the_rest(folder, tmp_path):
    def remove_midway(done, total):
        if done == 2:
            (folder / "4.png").unlink()  # listed; decoded or not by now (decoding runs ahead on threads)
    data = load_folder(folder, 8, cache=tmp_path / "cache", progress=remove_midway)
    assert "changed while its images were read" in data.cache_note and len(data) in (5, 6)
    assert not list((tmp_path / "cache").rglob("*.json"))
    after = load_folder(folder, 8, cache=tmp_path / "cache")
    assert len(after) == 5 and "cached in" in after.cache_note


def test_a_build_killed_part_way_leaves_nothing_that_is_read(folder, tmp_path):
    cache = tmp_path / "cache"
    path = cache_module.entry_path(folder, 8, 3, cache)
    path.parent.mkdir(parents=True)
    stale = path.with_name(f".{path.name}.999999999.tmp")  # a dead process's half-written file
    stale.write_bytes(b"\x00" * 50)
    data = load_folder(folder, 8, cache=cache)
    assert "cached in" in data.cache_note and not stale.exists()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["kept"]) == 6 and meta["reasons"] == {"6": "not an image"}


def test_training_from_the_cache_learns_the_same_weights_as_from_memory(folder, tmp_path):
    import diffuse_cli as diffuse

    runs = [diffuse.train(str(folder), preset="tiny", image_size=8, batch_size=4, steps=3, device="cpu",
                          precision="fp32", hflip=False, cache=cache) for cache in (False, tmp_path / "c")]
    again = diffuse.train(str(folder), preset="tiny", image_size=8, batch_size=4, steps=3, device="cpu",
                          precision="fp32", hflip=False, cache=tmp_path / "c")  # read from the entry
    for name, weight in runs[0].net.state_dict().items():
        assert torch.equal(weight, runs[1].net.state_dict()[name]) and torch.equal(weight, again.net.state_dict()[name])
