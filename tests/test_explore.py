"""The time slider: its frames against the forward process, and its page in a real browser (headless Chromium)."""

import shutil
from pathlib import Path

import pytest
import torch

import diffuse_cli as diffuse
from diffuse_cli.diffusion.pixels import to_model, to_uint8
from diffuse_cli.images.data import load_builtin
from diffuse_cli.diffusion.schedule import NoiseSchedule

from .conftest import assert_clean_error, write_image

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def model():
    return diffuse.train(load_builtin(8, n=64), preset="tiny", steps=30, batch_size=8, warmup=5, precision="fp32")


def test_frames_are_the_forward_process_the_walk_back_and_the_restorations(model):
    image = load_builtin(8, n=1).images[0]
    frames = diffuse.explore(model, image, frames=11, seed=4)
    T = model.config.diffusion.timesteps
    assert frames.ks == [round(i * T / 10) for i in range(11)] and frames.forward.shape == (11, 3, 8, 8)
    schedule = NoiseSchedule.make(model.config.diffusion.schedule, T)
    eps = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    for i, k in enumerate(frames.ks):  # one ε for every t: the forward frames are q(x_k | x_0) exactly
        expected = image if k == 0 else to_uint8(schedule.q_sample(to_model(image)[None], torch.tensor([k - 1]), eps)[0])
        assert torch.equal(frames.forward[i], expected), k
        assert frames.alpha_bar[i] == (1.0 if k == 0 else pytest.approx(schedule.alpha_bar[k - 1].item()))
    assert torch.equal(frames.walk[-1], frames.forward[-1])  # the walk back starts from the forward's static
    assert torch.equal(frames.walk[0], frames.walk_x0[0])  # and ends on the model's image
    assert torch.equal(frames.restored[0], image)
    first = (frames.restored[1].float() - image.float()).abs().mean()  # a little noise: the image comes back
    assert first < (frames.forward[1].float() - image.float()).abs().mean() + 1 and first < 20
    assert torch.equal(diffuse.explore(model, image, frames=11, seed=4).restored, frames.restored)  # seeded


def chromium_page():
    """A headless Chromium page, or a skip that says why there is none."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("no Chromium here (apt-get install chromium)")
    return sync_api


def test_the_page_shows_the_engines_frames_in_a_real_browser(model, tmp_path):
    sync_api = chromium_page()
    image = load_builtin(8, n=1).images[0]
    frames = diffuse.explore(model, image, frames=9, seed=1)
    path = diffuse.write_explorer(frames, tmp_path / "explore.html")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        page.wait_for_function("document.body.dataset.shown === '0'")
        for i in (0, 3, 8, 5):
            page.evaluate(f"s => {{ s.value = '{i}'; s.dispatchEvent(new Event('input')); }}",
                          page.query_selector("#t"))
            for name in ("forward", "walk", "walk_x0", "restored"):
                pixels = page.evaluate(f"""() => Array.from(document.getElementById('{name}').getContext('2d')
                                           .getImageData(0, 0, 8, 8).data)""")
                shown = torch.tensor(pixels, dtype=torch.uint8).view(8, 8, 4)[..., :3].permute(2, 0, 1)
                assert torch.equal(shown, getattr(frames, name)[i]), (name, i)
            assert f"t = {frames.ks[i]}" in page.inner_text("#readout")
        page.keyboard.press("ArrowLeft")  # the slider has the focus: arrow keys move it
        assert page.evaluate("document.getElementById('t').value") == "4"
        page.click("#play")
        page.wait_for_timeout(400)
        assert page.evaluate("document.getElementById('t').value") != "4"  # play sweeps t
        page.click("#play")
        browser.close()
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests  # nothing from the network


def test_explore_writes_one_page_and_refuses_bad_input_without_writing(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = ["--model", "tiny", "--image-size", "8", "--batch-size", "4", "--steps", "2"]
    assert run_cli("train", *train, "--out", "run").code == 0  # the built-in shapes: a conditional model
    made = run_cli("explore", "--checkpoint", "run", "--frames", "5", "--class", "circle")
    assert made.code == 0 and (tmp_path / "explore.html").exists(), made
    text = (tmp_path / "explore.html").read_text()
    assert "http://" not in text and "https://" not in text and "walks back out of it into a circle" in text
    write_image(tmp_path / "photo.png", size=(30, 20))
    assert run_cli("explore", "photo.png", "--checkpoint", "run", "--frames", "3", "--out", "p.html").code == 0
    (tmp_path / "notes.txt").write_text("not an image")
    for args, words in ((["nope.png"], ["no such file"]), (["notes.txt"], ["cannot read as an image"]),
                        (["--class", "hexagon"], ["unknown class 'hexagon'", "circle"]),
                        (["--out", "page.txt"], ["HTML page"])):
        assert_clean_error(run_cli("explore", *args, "--checkpoint", "run", "--out", "bad.html")
                           if "--out" not in args else run_cli("explore", *args, "--checkpoint", "run"), *words)
    (tmp_path / "foreign.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert_clean_error(run_cli("explore", "--checkpoint", "foreign.safetensors", "--out", "bad.html"),
                       "not a diffuse model checkpoint")
    assert not (tmp_path / "bad.html").exists() and not (tmp_path / "page.txt").exists()
    assert run_cli("train", *train, "--out", "gray", "--channels", "1").code == 0
    assert_clean_error(run_cli("explore", "photo.png", "--checkpoint", "gray", "--out", "bad.html"),
                       "in colour", "grayscale")
