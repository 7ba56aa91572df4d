"""Each command end to end on a tiny folder, and each bad input as one clear line."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.progress import Progress

from diffuse_cli.cli import console
from diffuse_cli.cli.app import app
from diffuse_cli.cli.console import TimeLeftColumn
from diffuse_cli.images.data import find_files
from diffuse_cli.images.decode import decode_image
from diffuse_cli.diffusion.samplers import SAMPLERS

from .conftest import assert_clean_error, write_image

README = Path(__file__).parent.parent / "README.md"
TINY = ["--model", "tiny", "--image-size", "8", "--batch-size", "4", "--sample-every", "100", "--save-every", "100"]


def commands():
    return [c.name or c.callback.__name__ for c in app.registered_commands]


def test_every_command_has_help_with_examples_and_is_in_the_readme(run_cli):
    readme = README.read_text()
    assert set(commands()) == {"train", "distill", "ema", "sample", "noise", "explore", "interpolate", "inspect", "import",
                               "export", "eval"}
    for name in commands():
        result = run_cli(name, "--help")
        assert result.code == 0 and "Examples" in result.out, name
        assert f"diffuse {name}" in readme, name


@pytest.fixture
def trained(tmp_path, image_folder, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", image_folder, *TINY, "--steps", "4", "--out", "checkpoints/run")
    assert result.code == 0, result
    return tmp_path / "checkpoints" / "run", result


def test_train_writes_a_run_folder(trained):
    run, result = trained
    assert "skipped 2 of 11 files" in result.err and "broken.png" in result.err and "notes.txt" in result.err
    start = " ".join((result.err + result.out).split())  # rich wraps long lines
    assert re.search(r"device \S+, precision \w+, preset tiny, [\d.]+M parameters, 9 images at 8x8, "
                     r"effective batch 4", start), start
    assert (run / "model.safetensors").exists() and (run / "training_state.safetensors").exists()
    grid = Image.open(run / "samples" / "step_000004.png")
    assert grid.mode == "RGB" and grid.width >= 4 * 8
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4 and {"loss", "lr", "images_per_s"} <= set(lines[-1])


def test_without_a_terminal_training_prints_status_lines(run_cli, image_folder, tmp_path, monkeypatch):
    """A batch job's log gets the first record, one line a TrainDisplay.STATUS_EVERY_S, and the last step."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console.TrainDisplay, "STATUS_EVERY_S", 1e9)
    result = run_cli("train", image_folder, *TINY, "--steps", "30", "--out", "run")
    assert result.code == 0, result
    lines = re.findall(r"^step (\d+)/30  loss \d+\.\d{4}  [\d.]+ img/s  elapsed \d:\d\d:\d\d  eta (\S+)$",
                       result.err, re.M)
    assert [step for step, _ in lines] == ["10", "30"] and lines[-1][1] == "0:00:00", result.err


def test_sample_on_the_cpu_lowers_a_batch_that_would_not_fit_and_draws_the_same_images(trained, run_cli, tmp_path,
                                                                                        monkeypatch):
    from diffuse_cli.network import device
    from diffuse_cli.diffusion.denoiser import SAMPLE_BYTES_PER_OUTPUT
    from diffuse_cli.formats.checkpoint import load_model
    from diffuse_cli.network.unet import layer_outputs

    plain = run_cli("sample", "-n", "5", "--steps", "3", "--out", "plain")
    assert plain.code == 0 and "at a time" not in plain.err, plain
    per_image = SAMPLE_BYTES_PER_OUTPUT * layer_outputs(load_model(trained[0] / "model.safetensors")[0], 1)
    monkeypatch.setattr(device, "memory_available", lambda: int(2.5 * per_image))  # room for two images
    lowered = run_cli("sample", "-n", "5", "--steps", "3", "--out", "lowered")
    assert lowered.code == 0 and "note: sampling 2 images at a time" in lowered.err, lowered
    for name in ("0000.png", "0004.png", "grid.png"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "lowered" / name).read_bytes(), name


def test_sample_uses_the_newest_checkpoint_and_is_reproducible(trained, run_cli, tmp_path):
    first = run_cli("sample", "-n", "3", "--steps", "5", "--out", "a", "--batch-size", "2")
    assert first.code == 0, first
    assert "ddim, 5 steps, 5 network calls" in first.out
    second = run_cli("sample", "-n", "3", "--steps", "5", "--out", "b", "--batch-size", "3")
    assert second.code == 0, second
    for name in ("0000.png", "0001.png", "0002.png", "grid.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    third = run_cli("sample", "-n", "2", "--sampler", "heun", "--steps", "3", "--trajectory", "--out", "c")
    assert third.code == 0 and "5 network calls" in third.out
    assert Image.open(tmp_path / "c" / "trajectory.gif").n_frames >= 3
    assert Image.open(tmp_path / "c" / "trajectory.png").mode == "RGB"


def test_many_samples_are_written_as_they_come_and_the_grid_shows_the_first_64(trained, run_cli, tmp_path,
                                                                              monkeypatch):
    import diffuse_cli.diffusion.denoiser

    result = run_cli("sample", "-n", "70", "--steps", "1", "--sampler", "ddim", "--batch-size", "32", "--out", "many")
    assert result.code == 0 and "grid.png (the first 64)" in result.out, result
    assert sorted(p.name for p in (tmp_path / "many").glob("0*.png")) == [f"{i:04d}.png" for i in range(70)]
    assert Image.open(tmp_path / "many" / "grid.png").size == (656, 656)  # 8x8 cells of 8+2 px, +2, enlarged 8x
    assert run_cli("sample", "-n", "1", "--steps", "1", "--sampler", "ddim").code == 0
    assert (tmp_path / "samples" / "run-step4-ddim-1steps-seed0" / "0000.png").exists()  # names the steps trained

    sampled = diffuse_cli.diffusion.denoiser.sample
    calls = []

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sampled(*args, **kwargs)

    monkeypatch.setattr(diffuse_cli.diffusion.denoiser, "sample", interrupted_at_the_second_batch)
    stopped = run_cli("sample", "-n", "70", "--steps", "1", "--sampler", "ddim", "--batch-size", "32", "--out", "cut")
    assert stopped.code == 130 and "interrupted; the 32 images made so far are in cut/" in stopped.err, stopped
    assert len(list((tmp_path / "cut").glob("0*.png"))) == 32  # the first batch, kept
    calls[:] = [1]  # the next call counts as the second: interrupted before any image is made
    stopped = run_cli("sample", "-n", "1", "--steps", "1", "--sampler", "ddim", "--out", "none")
    assert stopped.code == 130 and "no images were written" in stopped.err and not (tmp_path / "none").exists()


def test_sample_precision_auto_is_what_train_picks_and_fp16_needs_a_gpu(trained, run_cli, tmp_path):
    import torch

    from diffuse_cli.network.device import resolve_precision

    picked = resolve_precision("auto", torch.device("cpu"))
    for precision in ("auto", picked):
        assert run_cli("sample", "-n", "2", "--steps", "2", "--device", "cpu", "--precision", precision,
                       "--out", precision).code == 0
    assert (tmp_path / "auto" / "grid.png").read_bytes() == (tmp_path / picked / "grid.png").read_bytes()
    assert_clean_error(run_cli("sample", "-n", "1", "--device", "cpu", "--precision", "fp16"), "fp16 is for GPUs")


def test_inspect_table_and_json(trained, run_cli):
    run, _ = trained
    table = run_cli("inspect", run / "model.safetensors")
    assert table.code == 0 and "tiny" in table.out and "steps trained" in table.out
    data = json.loads(run_cli("inspect", run, "--json").out)
    assert data["step"] == 4 and data["preset"] == "tiny" and data["config"]["model"]["image_size"] == 8
    assert data["parameters"] > 1000 and data["data_size"] == 9
    newest = json.loads(run_cli("inspect", run.parent, "--json").out)  # a folder of runs: the newest
    assert newest["file"] == str(run / "model.safetensors")
    import diffuse_cli as diffuse  # the API gives a notebook the same, and the config as an object

    facts, config = diffuse.inspect(run)
    assert json.loads(json.dumps(facts)) == data and config.model.image_size == 8 and config.preset == "tiny"


def test_paths_with_brackets_are_printed_as_they_are(tmp_path, run_cli, monkeypatch):
    """Output is not read as rich markup: a folder named like a style tag, or a closing one, is a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run[v2]").mkdir()
    photo = write_image(tmp_path / "run[v2]" / "photo[bold].png", size=(12, 12))
    done = run_cli("noise", photo, "--t", "500", "--out", "run[v2]/noised[/b].png")
    assert done.code == 0 and "run[v2]/noised[/b].png" in done.out, done
    missing = run_cli("noise", "run[v2]/nope[red].png")
    assert_clean_error(missing, "run[v2]/nope[red].png")


def test_a_terminal_that_cannot_show_greek_letters_gets_question_marks(tmp_path):
    """train --help names σ_rel and γ; written to an ASCII stream they become '?', and the command succeeds."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    shown = subprocess.run([sys.executable, "-m", "diffuse_cli", "train", "--help"], capture_output=True, env=env,
                           cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr.decode("ascii", "replace")
    assert b"Min-SNR-? loss weighting" in shown.stdout and shown.stderr == b""


def test_what_diffuse_wrote_in_the_image_folder_is_not_taken_for_images(tmp_path, run_cli, monkeypatch):
    """`cd photos; diffuse sample` puts samples/ in the data folder (train refuses a run folder there): the next run
    trains on the two classes the user made, not on the samples as a third, and says what it left out; `diffuse
    eval` of a folder of samples scores the samples, not their grid.png."""
    root = tmp_path / "photos"
    for i in range(3):
        write_image(root / "cats" / f"{i}.png", seed=i)
        write_image(root / "dogs" / f"{i}.png", seed=10 + i)
    monkeypatch.chdir(root)
    assert run_cli("train", ".", *TINY, "--steps", "2", "--out", "../first").code == 0
    sampled = run_cli("sample", "--checkpoint", "../first", "-n", "2", "--steps", "2")
    written = list((root / "samples").glob("*/grid.png"))
    assert sampled.code == 0 and len(written) == 1, sampled
    again = run_cli("train", ".", *TINY, "--steps", "1", "--out", "../second")
    assert again.code == 0, again
    said = " ".join(again.err.split())
    assert "6 images at 8x8" in said and "classes 2: cats (3), dogs (3)" in said, said
    assert f"left out what diffuse wrote there (runs, grids of samples), not training images: samples/" \
           f"{written[0].parent.name}" in said, said
    assert [p.name for p in find_files(written[0].parent)] == ["0000.png", "0001.png"]


def test_noise_at_own_size_and_strip(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo = write_image(tmp_path / "photo.png", size=(50, 30))
    single = run_cli("noise", photo, "--t", "500")
    assert single.code == 0 and Image.open(tmp_path / "photo_t500.png").size == (50, 30)
    strip = run_cli("noise", photo, "--t", "0", "--t", "500", "--t", "1000", "--out", "s.png")
    assert strip.code == 0
    w, h = Image.open(tmp_path / "s.png").size
    assert w > 3 * 50 and h > 30
    zero = run_cli("noise", photo, "--t", "0", "--out", "z.png")
    assert zero.code == 0
    assert Image.open(tmp_path / "z.png").tobytes() == Image.open(photo).convert("RGB").tobytes()
    small = run_cli("noise", photo, "--t", "0", "--image-size", "16", "--out", "16.png")  # as a 16x16 model sees it
    assert small.code == 0
    seen = torch.from_numpy(np.array(Image.open(tmp_path / "16.png"))).permute(2, 0, 1)
    assert torch.equal(seen, decode_image(photo, 16).repeat_interleave(4, 1).repeat_interleave(4, 2))
    capped = run_cli("noise", photo, "--t", "0", "--t", "1000", "--max-side", "20", "--out", "c.png")
    assert capped.code == 0 and "shrunk from 50x30" in capped.out
    zoomed_out = Image.open(tmp_path / "c.png")
    assert zoomed_out.height < h and zoomed_out.width < w  # a strip of 20x12 panels, not 50x30 ones


def test_resume_continues_and_rerun_without_resume_refuses(trained, run_cli, image_folder):
    run, _ = trained
    again = run_cli("train", image_folder, *TINY, "--steps", "6", "--out", run)
    assert_clean_error(again, "already holds a run", "--resume auto")
    resumed = run_cli("train", image_folder, *TINY, "--steps", "6", "--out", run, "--resume", "auto")
    assert resumed.code == 0, resumed
    assert json.loads(run_cli("inspect", run, "--json").out)["step"] == 6
    done = run_cli("train", image_folder, *TINY, "--steps", "3", "--resume", run)
    assert done.code == 0 and "already at step 6 of 3" in done.err + done.out
    changed = run_cli("train", image_folder, "--image-size", "16", "--resume", run)
    assert_clean_error(changed, "image-size", "cannot change on resume")
    first = run_cli("train", image_folder, *TINY, "--steps", "1", "--out", run.parent / "first", "--resume", "auto")
    assert first.code == 0 and "(new: --resume auto found no run to continue)" in first.err, first  # a job's 1st start


def test_resume_without_data_trains_on_the_runs_own_images(trained, run_cli, image_folder):
    """What Ctrl-C's 'Resume with: diffuse train --resume RUN' says to type must not switch to the built-in shapes."""
    run, _ = trained
    resumed = run_cli("train", "--steps", "6", "--resume", run)
    assert resumed.code == 0, resumed
    said = " ".join((resumed.err + resumed.out).split())
    assert "9 images at 8x8" in said and "resuming, on its data" in said, said
    facts = json.loads(run_cli("inspect", run / "training_state.safetensors", "--json").out)
    assert (facts["step"], facts["data"], facts["data_size"]) == (6, str(image_folder.resolve()), 9)
    shared = json.loads(run_cli("inspect", run, "--json").out)  # the weights people share name the folder alone
    assert (shared["step"], shared["data"]) == (6, image_folder.name)
    image_folder.rename(image_folder.with_name("moved"))
    assert_clean_error(run_cli("train", "--steps", "8", "--resume", run), "not there any more", "FOLDER --resume")


BAD_INPUTS = {
    "missing folder": (["train", "no/such/folder"], ["no such file"]),
    "unknown preset": (["train", "--model", "huge"], ["unknown preset", "tiny"]),
    "bad image size": (["train", "--image-size", "30"], ["cannot be halved"]),
    "zero steps": (["train", "--steps", "0"], ["steps must be at least 1"]),
    "one diffusion step": (["train", "--timesteps", "1"], ["timesteps must be from 2 to 100,000, not 1"]),
    "negative batch": (["train", "--batch-size", "-3"], ["batch-size must be at least 1"]),
    "bad schedule": (["train", "--schedule", "wiggly"], ["unknown schedule", "cosine"]),
    "bad duration": (["train", "--max-time", "soon"], ["cannot read duration"]),
    "fp16 on the CPU": (["train", "--precision", "fp16", "--device", "cpu"], ["fp16 is for GPUs"]),
    "zero duration": (["train", "--max-time", "0s"], ["'0s' must be more than 0"]),
    "unknown sampler": (["sample", "--sampler", "magic"], ["unknown sampler", "dpm++2m"]),
    "zero images": (["sample", "-n", "0"], ["-n must be at least 1, not 0"]),
    "zero sample-every": (["train", "--sample-every", "0"], ["--sample-every must be at least 1, not 0"]),
    "eta for heun": (["sample", "--sampler", "heun", "--eta", "1"], ["--eta does not apply to heun", "dpm++3m-sde"]),
    "variance for ddim": (["sample", "--sampler", "ddim", "--variance", "beta"], ["--variance does not apply", "ddpm"]),
    "unknown variance": (["sample", "--sampler", "ddpm", "--variance", "big"], ["unknown variance", "posterior"]),
    "negative eta": (["sample", "--sampler", "ddim", "--eta", "-1"], ["at least 0"]),
    "ddim eta above 1": (["sample", "--sampler", "ddim", "--eta", "1.5"], ["--eta 1.5 is above 1"]),
    "no checkpoint": (["sample"], ["no checkpoint found"]),
    "missing checkpoint": (["sample", "--checkpoint", "nope.safetensors"], ["nope.safetensors", "no such file"]),
    "missing image": (["noise", "nope.png"], ["no such file"]),
    "image is a folder": (["noise", "."], ["is a folder"]),
    "t too large": (["noise", "x.png", "--t", "1001"], ["outside [0, 1000]"]),
    "t negative": (["noise", "x.png", "--t", "-1"], ["outside"]),
    "inspect missing": (["inspect", "nope.safetensors"], ["no such file"]),
    # nan passes every comparison, inf every lower bound: each float is held to being finite
    "infinite lr": (["train", "--lr", "inf"], ["lr must be a finite number, not inf"]),
    "nan grad-clip": (["train", "--grad-clip", "nan"], ["grad-clip must be a finite number, not nan"]),
    "nan min-snr": (["train", "--min-snr-gamma", "nan"], ["min-snr-gamma must be a finite number"]),
    "nan guidance": (["sample", "--guidance", "nan"], ["--guidance must be at least 0, and finite, not nan"]),
    "infinite eta": (["sample", "--sampler", "ddim", "--eta", "inf"], ["--eta must be at least 0, and finite"]),
    "seed beyond 2^32": (["train", "--seed", "99999999999999999999"], ["--seed must be from 0 to 4,294,967,295"]),
    "negative seed": (["sample", "--seed", "-1"], ["--seed must be from 0 to 4,294,967,295, not -1"]),
    "eval-n without eval-every": (["train", "--eval-n", "1"], ["--eval-n must be at least 2, not 1"]),
    "noise with zero timesteps": (["noise", "x.png", "--timesteps", "0"], ["--timesteps must be at least 2, not 0"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, words = BAD_INPUTS[case]
    result = run_cli(*args)
    assert_clean_error(result, *words)
    assert len(result.err.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "checkpoints").exists()  # refused before a run folder was made


def test_out_paths_that_name_the_wrong_kind_of_thing(trained, run_cli, tmp_path):
    run, _ = trained
    photo = write_image(tmp_path / "photo.png")
    assert_clean_error(run_cli("sample", "--checkpoint", run, "-n", "1", "--out", "mine.png"),
                       "names the folder for the PNGs", "--out mine")
    assert not (tmp_path / "mine.png").exists()
    assert_clean_error(run_cli("noise", photo, "--out", "x.jpg"), "written as a PNG", "x.png")
    assert_clean_error(run_cli("noise", photo, "--out", run), "is a folder", "noise.png")
    assert not list(run.glob(".*.tmp"))


def test_explore_and_interpolate_refuse_what_sample_refuses(trained, run_cli):
    run, _ = trained
    assert_clean_error(run_cli("explore", "--checkpoint", run, "--guidance", "-1"), "--guidance must be at least 0")
    assert_clean_error(run_cli("interpolate", "--checkpoint", run, "--seeds", "1", "-2"),
                       "--seeds must be from 0 to 4,294,967,295, not -2")
    assert not Path("explore.html").exists() and not Path("samples").exists()  # the run's fixture is in the cwd


def test_train_given_a_folders_files_names_the_folder(run_cli, image_folder, monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    result = run_cli("train", "images/rgb.png", "images/alpha.png", "--model", "tiny")  # what images/*.png expands to
    assert_clean_error(result, "takes one folder", "diffuse train images")


def test_folder_without_images_and_broken_checkpoints(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("train", "empty"), "no files")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_clean_error(run_cli("train", "junk"), "none of them a readable image")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    for command in ("sample", "inspect"):
        args = [command, "--checkpoint", "cut.safetensors"] if command == "sample" else [command, "cut.safetensors"]
        assert_clean_error(run_cli(*args), "cut.safetensors")
    (tmp_path / "text.png").write_text("hello")
    assert_clean_error(run_cli("noise", "text.png"), "cannot read as an image")
    for args in (["sample", "--checkpoint", "empty"], ["inspect", "empty"]):  # a folder that holds no run
        assert_clean_error(run_cli(*args), "empty: no model.safetensors in this folder or below")


def test_a_run_out_of_memory_says_what_to_try_and_leaves_no_folder(run_cli, image_folder, tmp_path, monkeypatch):
    """An empty folder named like a run, left by every failed attempt, is clutter that looks like a run."""
    import diffuse_cli.training.loop

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(diffuse_cli.training.loop, "make_optimizer", out_of_memory)
    result = run_cli("train", image_folder, *TINY, "--steps", "1", "--out", "checkpoints/run")
    assert_clean_error(result, "CUDA out of memory. Tried to allocate 2.00 GiB; try a smaller --batch-size")
    assert (tmp_path / "checkpoints").is_dir() and not (tmp_path / "checkpoints" / "run").exists()


def test_a_run_folder_inside_the_data_folder_is_refused(run_cli, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(run_cli("train", image_folder, "--out", image_folder / "runs" / "a"), "inside the data folder")
    assert not (image_folder / "runs").exists()


def test_ctrl_c_while_decoding_is_one_line(run_cli, image_folder, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("diffuse_cli.images.data.load_data", interrupted)
    result = run_cli("train", image_folder, "--out", "run")
    assert result.code == 130 and "interrupted while decoding the images; nothing was written" in result.err, result
    assert "Traceback" not in result.err and not (tmp_path / "run").exists()


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert "diffuse train" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1] and "pip install" in blocks[1]


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(trained, run_cli, image_folder, monkeypatch):
    import errno
    import os

    from diffuse_cli.formats.checkpoint import load_model

    run, _ = trained

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    result = run_cli("train", image_folder, *TINY, "--steps", "8", "--out", run, "--resume", "auto")
    monkeypatch.undo()
    assert_clean_error(result, "No space left on device", "intact")
    _, _, info = load_model(run / "model.safetensors")
    assert info["step"] == 4
    assert not list(run.glob(".*.tmp"))

    monkeypatch.setattr(os, "fsync", disk_full)  # a new run on a full disk leaves no empty run folder behind
    fresh = run_cli("train", image_folder, *TINY, "--steps", "2", "--out", run.parent / "new")
    monkeypatch.undo()
    assert_clean_error(fresh, "No space left on device")
    assert not (run.parent / "new").exists()


def test_unwritable_run_folder_is_a_clear_error(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("a file where a folder should be")
    result = run_cli("train", *TINY, "--steps", "2", "--out", "file/run")
    assert_clean_error(result, "file/run")


def test_a_grayscale_folder_trains_a_grayscale_model(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, mode in enumerate(["L", "I;16", "L"]):
        write_image(tmp_path / "scans" / f"{i}.png", mode, seed=i)
    result = run_cli("train", "scans", *TINY, "--steps", "2", "--out", "run")
    assert result.code == 0, result
    assert "every image is grayscale" in result.err
    assert Image.open(tmp_path / "run" / "samples" / "step_000002.png").mode == "L"
    assert run_cli("sample", "--checkpoint", "run", "-n", "2", "--steps", "2", "--out", "drawn").code == 0
    assert Image.open(tmp_path / "drawn" / "grid.png").mode == "L"
    result = run_cli("train", "scans", *TINY, "--steps", "2", "--out", "rgb", "--channels", "3")
    assert "grayscale" not in result.err and Image.open(tmp_path / "rgb" / "samples" / "step_000002.png").mode == "RGB"


def test_enlarging_small_images_is_a_warning(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, size in enumerate([(20, 14), (30, 30)]):
        write_image(tmp_path / "icons" / f"{i}.png", size=size, seed=i)
    args = ["--model", "tiny", "--batch-size", "2", "--steps", "1"]
    enlarged = run_cli("train", "icons", *args, "--image-size", "16", "--out", "a")
    assert enlarged.code == 0 and "1 of 2 images is smaller than --image-size 16 (the smallest is 14" in enlarged.err
    assert "is enlarged, which blurs it; a smaller --image-size keeps its detail" in enlarged.err
    both = run_cli("train", "icons", *args, "--image-size", "32", "--out", "c")
    assert "2 of 2 images are smaller than --image-size 32 (the smallest is 14 pixels" in both.err
    assert "are enlarged, which blurs them; a smaller --image-size keeps their detail" in both.err
    assert "smaller than" not in run_cli("train", "icons", *args, "--image-size", "8", "--out", "b").err


def test_a_small_folder_gets_a_note_that_samples_will_copy_it(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(2):
        write_image(tmp_path / "few" / f"{i}.png", seed=i)
    args = ["few", "--model", "tiny", "--batch-size", "2", "--steps", "1", "--image-size", "8"]
    monkeypatch.setattr("diffuse_cli.images.data.FEW_IMAGES", 3)
    noted = run_cli("train", *args, "--out", "a")
    assert noted.code == 0 and "note: 2 images is few" in noted.err
    monkeypatch.setattr("diffuse_cli.images.data.FEW_IMAGES", 2)
    assert "is few" not in run_cli("train", *args, "--out", "b").err


def test_an_out_that_is_a_file_is_refused_before_any_work(trained, run_cli, image_folder):
    run, _ = trained  # the working directory is the trained run's tmp_path
    Path("taken.png").write_bytes(b"not ours to overwrite")
    for args in (["train", image_folder, *TINY, "--steps", "2"], ["sample", "--checkpoint", run, "-n", "1"]):
        result = run_cli(*args, "--out", "taken.png")
        assert_clean_error(result, "taken.png is a file")
        assert result.code == 2 and "skipped" not in result.err  # refused before decoding the folder
    assert Path("taken.png").read_bytes() == b"not ours to overwrite"
    inside_a_file = run_cli("sample", "--checkpoint", run, "-n", "1", "--steps", "1", "--out", "taken.png/samples")
    assert_clean_error(inside_a_file, "taken.png/samples")
    assert "checkpoint" not in inside_a_file.err  # sampling writes no checkpoint, so it promises nothing about one


def test_after_training_ctrl_c_and_sigterm_mean_what_they_meant_before(run_cli, tmp_path, monkeypatch):
    """While training, Ctrl-C, SIGTERM and SIGUSR1 save and stop; once the run is over (here in-process, as a
    notebook or a test calls main()) the handlers it replaced are back, so nothing is swallowed afterwards."""
    import signal

    monkeypatch.chdir(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s}
    assert run_cli("train", *TINY, "--steps", "2", "--out", "r").code == 0
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_documented_choice_is_accepted(run_cli, tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", *TINY, "--steps", "1", "--out", "r", "--lr-schedule", "constant", "--schedule", "sigmoid",
                     "--objective", "x0", "--precision", "fp32", "--min-snr-gamma", "0", "--grad-accum", "2",
                     "--device", device)
    assert result.code == 0, result
    for sampler in SAMPLERS:
        for spacing in ("trailing", "quadratic", "karras", "logsnr"):
            result = run_cli("sample", "-n", "1", "--steps", "3", "--checkpoint", "r", "--sampler", sampler,
                             "--spacing", spacing, "--out", f"s-{sampler}-{spacing}", "--device", device)
            assert result.code == 0, (sampler, spacing, result)
            assert Image.open(tmp_path / f"s-{sampler}-{spacing}" / "0000.png").size == (8, 8)
    for sampler, eta in (("ddim", "0.5"), ("dpm++3m", "1"), ("dpm++2m-sde", "0")):
        assert run_cli("sample", "-n", "1", "--steps", "3", "--checkpoint", "r", "--sampler", sampler,
                       "--eta", eta, "--out", f"e-{sampler}", "--device", device).code == 0


def test_eta_is_the_time_left_when_the_max_time_budget_ends_first():
    clock = [1.0]
    progress = Progress(get_time=lambda: clock[0])
    now = time.monotonic()
    tasks = {name: progress.add_task("training", total=100, deadline=deadline)
             for name, deadline in [("steps end first", now + 3600), ("time ends first", now + 5), ("no budget", None)]}
    for clock[0], done in ((6.0, 25), (11.0, 50)):  # 5 steps/s: the last 50 steps take 10 s
        for task in tasks.values():
            progress.update(task, completed=done)
    eta = {name: str(TimeLeftColumn().render(progress.tasks[task])) for name, task in tasks.items()}
    assert eta["steps end first"] == eta["no budget"] == "0:00:10"
    assert eta["time ends first"] in ("0:00:04", "0:00:05")


def test_messages_with_brackets_print_literally(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("sample", "--checkpoint", "[/weird]/x.safetensors")
    assert_clean_error(result, "[/weird]/x.safetensors")


def test_a_run_folder_in_use_by_another_training_is_refused(run_cli, image_folder, tmp_path, monkeypatch):
    from diffuse_cli.training.runs import claim

    monkeypatch.chdir(tmp_path)
    with claim(tmp_path / "busy"):  # as another `diffuse train --out busy` holds it (flock is per open file)
        assert_clean_error(run_cli("train", image_folder, *TINY, "--steps", "1", "--out", "busy"),
                           "busy is being trained by another diffuse process")
        assert list((tmp_path / "busy").iterdir()) == []  # nothing of the other run's was touched
    assert run_cli("train", image_folder, *TINY, "--steps", "1", "--out", "busy").code == 0  # released


def test_an_existing_run_is_resumed_only_when_asked(tmp_path, monkeypatch):
    from diffuse_cli.errors import RunError
    from diffuse_cli.formats.files import STATE_FILE
    from diffuse_cli.training.runs import resolve_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / STATE_FILE).write_bytes(b"")
    questions = []
    ask = lambda answer: lambda q: questions.append(q) or answer  # noqa: E731
    assert resolve_run(Path("run"), None, None, "tiny", ask(True)) == (Path("run"), True)
    assert "run already holds a run" in questions[0]
    for confirm in (ask(False), None):  # "no" on a terminal, or no terminal to ask on
        with pytest.raises(RunError, match="pass resume auto"):  # as the API words it; the CLI: --resume auto
            resolve_run(Path("run"), None, None, "tiny", confirm)
    assert resolve_run(Path("run"), "auto", None, "tiny") == (Path("run"), True)
    fresh, resuming = resolve_run(None, None, None, "tiny")
    assert not resuming and fresh.parent == Path("checkpoints") and fresh.name.startswith("shapes-tiny-")


def test_a_run_shows_how_it_went_in_loss_png_and_inspect_names_it(trained, run_cli):
    run, _ = trained
    assert Image.open(run / "loss.png").size == (720, 460)
    assert json.loads(run_cli("inspect", run, "--json").out)["loss_plot"] == str(run / "loss.png")
    assert "loss plot" in run_cli("inspect", run).out


def test_the_start_of_a_run_names_each_choice_made_for_the_user(run_cli, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--model", "tiny", "--batch-size", "4", "--save-every", "100", "--sample-every", "100"]
    chosen_for = run_cli("train", image_folder, *small, "--max-time", "2s", "--out", "a")
    said = " ".join(chosen_for.err.split())
    assert chosen_for.code == 0 and "choices made for this run" in said, chosen_for
    for row in ("mirroring on: too few images to probe", "image size 32x32", "--image-size", "channels 3 (RGB)",
                "precision", "steps fitted to the time budget once the speed is known --steps"):
        assert row in said, (row, said)
    chose_all = run_cli("train", image_folder, *small, "--steps", "1", "--image-size", "8", "--hflip", "on",
                        "--precision", "fp32", "--channels", "3", "--out", "b")
    assert chose_all.code == 0 and "choices made" not in chose_all.err, chose_all
