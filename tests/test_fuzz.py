"""Every file diffuse reads, mutated: both safetensors files, the diffusers export's configs and weights, our
config beside them, and an image cache entry (model_index.json is never read: import needs only unet/ and scheduler/). Each case must end in a clean load or one DiffuseError (the CLI's one line and exit 2), in
under a second, never allocating what a header claims (tests/fuzzing.py). CPU, float32; a fixed seed, so the
cases are the same on every machine. benchmarks/fuzz.py runs as many as asked."""

from __future__ import annotations

import random

import pytest
import torch

from .fuzzing import make_corpus, run_case

CASES_PER_ROLE = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("role", ["model", "state", "unet_config", "unet_weights", "scheduler", "ours", "data_cache"])
def test_every_mutated_file_loads_or_is_refused_in_one_line(corpus, role, tmp_path):
    rng = random.Random(f"{role}-0")
    outcomes = [run_case(corpus, role, rng, tmp_path) for _ in range(CASES_PER_ROLE)]
    bugs = [o for o in outcomes if not o.ok]
    assert not bugs, "\n".join(f"{o.kind}: {o.result} in {o.seconds:.2f} s, +{o.growth_mb:.0f} MB: {o.message}"
                               for o in bugs[:5])
    if role == "data_cache":  # a damaged entry is decoded again: every case loads, and loads the right images
        assert all(o.result == "loaded" for o in outcomes)
    else:
        assert any(o.result == "refused" for o in outcomes)  # the mutations reach the checks: the test can fail


def test_the_unmutated_corpus_loads(corpus, tmp_path):
    from .fuzzing import read_diffusers, read_model, read_state

    """Unmutated, each file of the corpus reads back as the same network (CPU, fp32): the model file's weights are
    the training state's EMA weights, and the diffusers export computes what they compute."""
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    nets = [read_model(corpus["model"]).eval(), read_state(corpus["state"]).eval(),
            read_diffusers(corpus["scheduler"].parents[1]).eval()]
    with torch.no_grad():
        eps = [net(x, t) for net in nets]
    assert torch.equal(eps[0], eps[1]) and torch.allclose(eps[0], eps[2], atol=1e-5)
    assert eps[0].abs().max() > 0
