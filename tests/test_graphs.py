"""CUDA graphs replay what eager code computes (on a GPU), and a capture that fails leaves eager calls."""

import pytest
import torch

from diffuse_cli.network import graphs
from diffuse_cli.config import Config
from diffuse_cli.presets import model_config
from diffuse_cli.diffusion.denoiser import SampleHooks, generate
from diffuse_cli.network.unet import UNet

@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_sampling_draws_the_eager_images(precision):
    config = Config(preset="tiny", model=model_config("tiny", image_size=8))
    torch.manual_seed(0)
    model = UNet(config.model).cuda().to(memory_format=torch.channels_last).eval()
    runs = {graph: generate(model, config, 5, sampler="dpm++2m-sde", steps=6, batch_size=3, precision=precision,
                            hooks=SampleHooks(cuda_graph=graph)) for graph in (True, False)}  # batches of 3 and 2: two graphs
    (graphed, nfe), (eager, _) = runs[True], runs[False]
    assert nfe == 6 and graphed.shape == (5, 3, 8, 8)
    assert (graphed.int() - eager.int()).abs().max() <= 1  # uint8 images; rounding may flip one level
    assert graphed.float().std() > 0


@pytest.fixture
def capture_fails(monkeypatch):
    """Every capture raises, as an operator that cannot be recorded would; warm-up runs in place."""
    def fail(fn, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")
    monkeypatch.setattr(graphs, "_capture", fail)
    monkeypatch.setattr(graphs, "_warm_up", lambda fn: fn())
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: None)


def test_a_failed_step_capture_runs_every_step_eagerly_once(capture_fails):
    ran, told = [], []
    step = graphs.graphed_step(lambda: ran.append(1), warmup=3, on_fallback=told.append)
    for _ in range(6):
        step()
    assert len(ran) == 6  # 3 warm-ups, the call whose capture failed, 2 more: none lost, none doubled
    assert told == ["operation not permitted when stream is capturing"]


def test_a_failed_forward_capture_returns_eager_outputs(capture_fails):
    told = []
    forward = graphs.graphed_forward(lambda x, t: x * t[:, None], on_fallback=told.append)
    for batch in (3, 2, 3):
        x, t = torch.randn(batch, 4), torch.arange(batch).float()
        assert torch.equal(forward(x, t), x * t[:, None])
    assert told == ["operation not permitted when stream is capturing"]  # told once, not per shape
