"""Every file diffuse reads, mutated: both safetensors files, the diffusers export's configs and weights, our
config beside them, and an image cache entry (model_index.json is never read: import needs only unet/ and scheduler/). Each case must end in a clean load or one DiffuseError (the CLI's one line and exit 2), in
under a second, never allocating what a header claims (tests/fuzzing.py). CPU, float32; a fixed seed, so the
cases are the same on every machine. benchmarks/fuzz.py runs as many as asked."""

from __future__ import annotations

import random

import pytest

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

    read_model(corpus["model"])
    read_state(corpus["state"])
    read_diffusers(corpus["scheduler"].parents[1])
