"""`train --from`: a new run starting from a trained model's weights (EDM's transfer). CPU, fp32, tiny networks."""

import pytest
import torch

import diffuse_cli as diffuse
from diffuse_cli.errors import DiffuseError
from diffuse_cli.formats.checkpoint import load_model
from diffuse_cli.formats.files import MODEL_FILE
from diffuse_cli.images.data import ImageData, load_builtin
from diffuse_cli.training.loop import Hooks

from .conftest import assert_clean_error

SETTINGS = dict(batch_size=4, precision="fp32", warmup=0, save_every=100, sample_every=100)
STILL = dict(steps=1, lr=1e-30)  # one step that moves no weight: the run's weights are what it started from
SHAPES = load_builtin(8, n=16)  # four classes
PLAIN = ImageData.from_tensor(SHAPES.batch(torch.arange(16)))  # the same images, no classes


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two trained models: on the shapes with their classes, and on the same images without."""
    root = tmp_path_factory.mktemp("from")
    for name, data in (("classes", SHAPES), ("plain", PLAIN)):
        diffuse.train(data, out=root / name, preset="tiny", steps=3, **SETTINGS)
    return root


def outputs(net, labels=None):
    x, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        return net(x, t, labels)


def test_the_run_starts_as_the_model_was(sources, tmp_path):
    source, _, _ = load_model(sources / "classes" / MODEL_FILE)
    run = diffuse.train(SHAPES, out=tmp_path / "run", start_from=sources / "classes", **STILL, **SETTINGS)
    assert run.config.model == source.cfg and run.config.train.lr == 1e-30 and run.training.step == 1
    for name, value in source.state_dict().items():
        assert torch.equal(run.net.state_dict()[name], value), name


def test_classes_the_model_had_not_get_a_zero_embedding_and_change_nothing_at_first(sources, tmp_path):
    source, _, _ = load_model(sources / "plain" / MODEL_FILE)
    logs = []
    run = diffuse.train(SHAPES, out=tmp_path / "run", start_from=sources / "plain", hooks=Hooks(log=logs.append),
                        **STILL, **SETTINGS)
    assert run.config.model.class_names == tuple(SHAPES.classes) and not source.cfg.class_names
    assert "a new class embedding for the data's 4 classes" in " ".join(logs)
    for label in range(5):  # each class, and "no class"
        torch.testing.assert_close(outputs(run.net.cpu(), torch.full((4,), label)), outputs(source), rtol=0, atol=1e-6)


def test_data_without_classes_leaves_the_models_embedding_out(sources, tmp_path):
    run = diffuse.train(PLAIN, out=tmp_path / "run", start_from=sources / "classes", **STILL, **SETTINGS)
    assert run.config.model.class_names == () and run.net.class_emb is None


def test_a_run_from_a_model_resumes_bit_for_bit(sources, tmp_path):
    settings = dict(steps=6, **SETTINGS)
    straight = diffuse.train(SHAPES, out=tmp_path / "a", start_from=sources / "plain", **settings)
    first = diffuse.train(SHAPES, out=tmp_path / "b", start_from=sources / "plain",
                          hooks=Hooks(should_stop=lambda step: step == 3), **settings)
    assert first.training.stopped_by == "signal"
    resumed = diffuse.train(SHAPES, out=tmp_path / "b", resume=True)
    assert resumed.training.step == 6
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("args, says", [
    (["--image-size", "16"], "--image-size is the model's"),
    (["--model", "small"], "--model and --from both name the network"),
    (["--objective", "eps"], "--objective is the model's"),
])
def test_train_from_refuses_what_the_model_decides(sources, run_cli, tmp_path, args, says):
    result = run_cli("train", "--from", sources / "plain", "--out", tmp_path / "run", "--steps", "1", *args)
    assert_clean_error(result, says)
    assert result.code == 2 and not (tmp_path / "run").exists()


def test_train_from_what_is_not_a_model_says_so(run_cli, tmp_path):
    result = run_cli("train", "--from", tmp_path / "nothing.safetensors", "--out", tmp_path / "run", "--steps", "1")
    assert_clean_error(result, "no such file")
    assert result.code == 2 and not (tmp_path / "run").exists()


def test_images_of_other_channels_are_refused(sources):
    gray = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DiffuseError, match=r"the images have 1 channel\(s\) and the model"):
        diffuse.train(gray, start_from=sources / "plain", **STILL, **SETTINGS)
