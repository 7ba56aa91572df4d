"""The Python API as a notebook uses it: train on a tensor, sample, save, load, noise; no file unless asked."""

import pytest
import torch

import diffuse_cli as diffuse
from diffuse_cli.diffusion.pixels import to_model
from diffuse_cli.images.data import load_builtin
from diffuse_cli.images.decode import read_image
from diffuse_cli.errors import ConfigError, DataError, DiffuseError, UsageError
from diffuse_cli.formats.files import MODEL_FILE, STATE_FILE
from diffuse_cli.diffusion.schedule import NoiseSchedule

TINY = dict(preset="tiny", batch_size=4, warmup=1, precision="fp32")
IMAGES = load_builtin(8, n=12).images  # uint8 (12, 3, 8, 8)


def test_a_notebook_trains_on_a_tensor_and_samples_and_nothing_is_written_unasked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = diffuse.train(IMAGES, steps=3, **TINY)
    assert model.training.step == 3 and model.config.model.image_size == 8 and model.path is None
    images = model.sample(3, steps=3, seed=5)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)
    assert torch.equal(model.sample(3, steps=3, seed=5, batch_size=1), images)  # image i from seed + i
    assert torch.equal(model.sample(1, steps=3, seed=7), images[2:])
    assert list(tmp_path.iterdir()) == []

    saved = model.save(tmp_path / "mine.safetensors")
    loaded = diffuse.load(saved, device="cpu")
    assert loaded.config == model.config and torch.equal(loaded.sample(3, steps=3, seed=5), images)
    paths = diffuse.save_images(images, tmp_path / "drawn")
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert torch.equal(read_image(paths[1]), images[1]) and (tmp_path / "drawn" / "grid.png").exists()


def test_float_images_in_minus_one_to_one_train_as_their_uint8_pixels(tmp_path):
    as_float = diffuse.train(to_model(IMAGES), steps=2, **TINY)
    as_uint8 = diffuse.train(IMAGES, steps=2, **TINY)
    for a, b in zip(as_float.net.state_dict().values(), as_uint8.net.state_dict().values()):
        assert torch.equal(a, b)


def test_with_a_run_folder_train_writes_the_run_and_resumes_it(tmp_path):
    first = diffuse.train(IMAGES, out=tmp_path / "run", steps=2, **TINY)
    assert first.path == tmp_path / "run" / MODEL_FILE and (tmp_path / "run" / STATE_FILE).exists()
    resumed = diffuse.train(IMAGES, out=tmp_path / "run", resume=True, steps=4)
    straight = diffuse.train(IMAGES, out=tmp_path / "straight", steps=4, **TINY)
    assert resumed.training.step == 4 and resumed.info["step"] == 4
    for a, b in zip(resumed.net.state_dict().values(), straight.net.state_dict().values()):
        assert torch.equal(a, b)  # 2 + resume + 2 = 4, bit for bit
    with pytest.raises(DiffuseError, match="cannot change on resume"):
        diffuse.train(IMAGES, out=tmp_path / "run", resume=True, objective="eps")


def test_noise_is_q_sample_with_one_eps():
    image = IMAGES[0]
    panels = diffuse.noise(image, [0, 1, 500, 1000], schedule="linear", seed=3)
    assert panels.shape == (4, 3, 8, 8) and torch.equal(panels[0], image)
    eps = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    schedule = NoiseSchedule.make("linear", 1000)
    for panel, t in zip(panels[1:], (1, 500, 1000)):  # --t k is "after k forward steps": index k - 1
        ab = schedule.alpha_bar[t - 1].item()
        expected = ab ** 0.5 * to_model(image)[None] + (1 - ab) ** 0.5 * eps
        assert (to_model(panel) - expected[0].clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6


@pytest.mark.parametrize("call, error, words", [
    (lambda: diffuse.train(torch.zeros(4, 2, 8, 8, dtype=torch.uint8)), DataError, "C 1 or 3"),
    (lambda: diffuse.train(torch.zeros(4, 3, 8, 6)), DataError, "H = W"),
    (lambda: diffuse.train(IMAGES, image_size=16), DataError, "the images are 8x8"),
    (lambda: diffuse.train(IMAGES, learning_rate=1), ConfigError, "unknown setting 'learning_rate'"),
    (lambda: diffuse.train(IMAGES, objective="score"), ConfigError, "unknown objective"),
    (lambda: diffuse.train(IMAGES, resume=True), UsageError, "needs out"),
    (lambda: diffuse.noise(IMAGES[0], [-1]), UsageError, "outside [0, 1000]"),
    (lambda: diffuse.noise("no/such.png", [1]), DataError, "no such file"),
])
def test_input_that_cannot_work_is_a_diffuse_error_that_names_it(call, error, words):
    with pytest.raises(error) as caught:
        call()
    assert words in str(caught.value)


def test_sample_settings_are_checked_before_any_network_call():
    model = diffuse.train(IMAGES, steps=1, **TINY)
    calls = []
    model.net.register_forward_hook(lambda *args: calls.append(1))
    for settings, words in [(dict(sampler="magic"), "unknown sampler"), (dict(steps=1001), "more than the model's"),
                            (dict(sampler="heun", eta=0.5), "^eta does not apply to heun")]:
        with pytest.raises(DiffuseError, match=words):
            model.sample(2, **settings)
    with pytest.raises(UsageError, match="^n must be at least 1"):  # the API names settings; the CLI its flags
        model.sample(0)
    assert calls == []
