"""CUDA graphs replay what eager code computes (these run only where a GPU is)."""

import pytest
import torch

from diffuse_cli.config import Config, model_config
from diffuse_cli.generate import generate
from diffuse_cli.unet import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_sampling_draws_the_eager_images(precision):
    config = Config(preset="tiny", model=model_config("tiny", image_size=8))
    torch.manual_seed(0)
    model = UNet(config.model).cuda().to(memory_format=torch.channels_last).eval()
    runs = {graph: generate(model, config, 5, sampler="dpm++2m-sde", steps=6, batch_size=3, precision=precision,
                            cuda_graph=graph) for graph in (True, False)}  # batches of 3 and 2: two graphs
    (graphed, nfe), (eager, _) = runs[True], runs[False]
    assert nfe == 6 and graphed.shape == (5, 3, 8, 8)
    assert (graphed.int() - eager.int()).abs().max() <= 1  # uint8 images; rounding may flip one level
    assert graphed.float().std() > 0
