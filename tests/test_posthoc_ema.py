"""Post-hoc EMA (Karras et al. 2024): the power-function averages, their snapshots, and the EMA of any length rebuilt
from them. CPU, float64 for the identities, float32 training (float16 snapshots) for the runs."""

import json
from dataclasses import replace

import pytest
import torch

from diffuse_cli.config import Config, TrainConfig
from diffuse_cli.formats.checkpoint import load_model, load_training_state
from diffuse_cli.formats.files import MODEL_FILE, STATE_FILE
from diffuse_cli.formats.snapshots import list_snapshots, load_snapshot
from diffuse_cli.images.data import load_builtin
from diffuse_cli.network.unet import UNet
from diffuse_cli.presets import model_config
from diffuse_cli.training import posthoc_ema as phema
from diffuse_cli.training.loop import Hooks, Options, train
from .conftest import assert_clean_error

CONFIG = Config(preset="tiny", model=model_config("tiny", image_size=8),
                train=TrainConfig(batch_size=4, steps=24, warmup=2, precision="fp32", lr=3e-3))
DATA = load_builtin(8, n=16)
OPTIONS = Options(save_every=100, sample_every=100, grid_steps=2)


def direct(thetas: torch.Tensor, sigma_rel: float, upto: int) -> torch.Tensor:
    """The average of length σ_rel at step `upto`, run step by step with the decay β(t) (eq. 127)."""
    gamma, average = phema.gamma_of(sigma_rel), torch.zeros_like(thetas[0])
    for t in range(1, upto + 1):
        average = average.lerp(thetas[t - 1], 1 - phema.beta(t, gamma))
    return average


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.25])
def test_the_exponent_gives_back_its_length(sigma_rel):
    gamma = phema.gamma_of(sigma_rel)
    assert phema.sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # eq. 126: γ is a root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)
    s2 = sigma_rel ** -2
    assert gamma ** 3 + 7 * gamma ** 2 + (16 - s2) * gamma + 12 - s2 == pytest.approx(0, abs=1e-6 * gamma ** 3)


def test_the_decay_runs_the_power_function_profile_exactly():
    """Σ_τ θ_τ (τ^(γ+1) − (τ−1)^(γ+1)) / T^(γ+1) is what the step-by-step average holds, and the weights sum to 1."""
    thetas = torch.randn(200, 30, dtype=torch.float64).cumsum(0)
    taus = torch.arange(1, 201, dtype=torch.float64)
    for sigma_rel in (0.05, 0.13):
        w = phema.weights(200, phema.gamma_of(sigma_rel), taus)
        assert w.sum().item() == pytest.approx(1, abs=1e-12)
        torch.testing.assert_close(w @ thetas, direct(thetas, sigma_rel, 200), rtol=0, atol=1e-10)
        assert phema.weights(120, phema.gamma_of(sigma_rel), taus)[120:].abs().max() == 0  # nothing after its step


@pytest.mark.parametrize("target", [0.03, 0.07, 0.2])
def test_with_a_snapshot_every_step_any_length_is_rebuilt_exactly(target):
    thetas = torch.randn(60, 20, dtype=torch.float64).cumsum(0)
    snaps = [(t, s) for t in range(1, 61) for s in (0.05, 0.10)]
    coefs = phema.coefficients(snaps, 60, target)
    rebuilt = sum(c * direct(thetas, s, t) for c, (t, s) in zip(coefs, snaps))
    torch.testing.assert_close(rebuilt, direct(thetas, target, 60), rtol=0, atol=1e-8)


def test_a_runs_few_snapshots_rebuild_a_length_between_its_profiles_closely():
    """The snapshots a 300-step run keeps (at most MAX_SNAPSHOTS, and its last): the EMA of length 0.07 rebuilt is
    20x nearer the one run directly than either stored profile is."""
    thetas = torch.randn(300, 40, dtype=torch.float64).cumsum(0)
    kept = sorted(set(phema.kept_snapshots(range(1, 301), 300)) & set(range(phema.SNAPSHOT_EVERY, 301)) | {300})
    assert len(kept) <= phema.MAX_SNAPSHOTS + 1
    snaps = [(t, s) for t in kept for s in (0.05, 0.10)]
    coefs = phema.coefficients(snaps, 300, 0.07)
    rebuilt = sum(c * direct(thetas, s, t) for c, (t, s) in zip(coefs, snaps))
    truth = direct(thetas, 0.07, 300)
    nearest_stored = min((direct(thetas, s, 300) - truth).norm() for s in (0.05, 0.10))
    assert (rebuilt - truth).norm() < nearest_stored / 20


def run_states(run):
    """The training state's tensors of a run by name (weights, EMA, averages, optimizer)."""
    from safetensors.torch import load_file

    return load_file(run / STATE_FILE)


def test_a_training_run_rebuilds_the_ema_it_ran_directly(tmp_path, monkeypatch):
    """Snapshots at every step of a run keeping three averages: the one of length 0.2 rebuilt from the other two's
    snapshots is the one training ran, to float32's rounding (the snapshots kept in float32 here, float16 by
    default), while the nearest stored profile is 1000 times as far from it."""
    from diffuse_cli.formats import snapshots

    monkeypatch.setattr(phema, "SNAPSHOT_EVERY", 1)
    monkeypatch.setattr(phema, "MAX_SNAPSHOTS", 1000)
    monkeypatch.setattr(snapshots, "SNAPSHOT_DTYPE", torch.float32)
    config = replace(CONFIG, train=replace(CONFIG.train, posthoc_ema=(0.05, 0.10, 0.2)))
    train(config, DATA, tmp_path / "run", OPTIONS)
    snaps = phema.Snapshots(tmp_path / "run")
    assert sorted(list_snapshots(tmp_path / "run")) == list(range(1, 25)) and snaps.step == 24
    ran = {name[len("average2."):]: v for name, v in run_states(tmp_path / "run").items() if name.startswith("average2.")}
    snaps.parts = [part for part in snaps.parts if part[1] != 0.2]
    rebuilt = snaps.rebuild(0.2)
    stored = {k: v for _, s, w in snaps.parts if s == 0.10 for k, v in w.items()}  # the last 0.10 snapshot
    error = max((rebuilt[k] - v).abs().max().item() for k, v in ran.items())
    assert error < 1e-5 and max((stored[k] - v).abs().max().item() for k, v in ran.items()) > 1000 * error


def test_snapshots_stay_few_and_a_resumed_run_keeps_the_same_averages(tmp_path):
    straight = train(CONFIG, DATA, tmp_path / "a", replace(OPTIONS))
    assert sorted(list_snapshots(tmp_path / "a")) == [16, 24]
    first = train(CONFIG, DATA, tmp_path / "b", OPTIONS, Hooks(should_stop=lambda step: step == 11))
    assert first.stopped_by == "signal" and sorted(list_snapshots(tmp_path / "b")) == [11]
    train(CONFIG, DATA, tmp_path / "b", replace(OPTIONS, resume=True))
    assert sorted(list_snapshots(tmp_path / "b")) == [16, 24]  # step 11's went when its spacing said so
    a, b = run_states(tmp_path / "a"), run_states(tmp_path / "b")
    assert any(k.startswith("average1.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for step in (16, 24):
        _, info, wa = load_snapshot(list_snapshots(tmp_path / "a")[step])
        _, _, wb = load_snapshot(list_snapshots(tmp_path / "b")[step])
        assert info["step"] == step and all(torch.equal(wa[s][k], wb[s][k]) for s in wa for k in wa[s])
    assert straight.step == 24


def test_a_state_from_before_post_hoc_ema_resumes_without_it(tmp_path):
    old = replace(CONFIG, train=replace(CONFIG.train, posthoc_ema=()))
    train(old, DATA, tmp_path / "run", OPTIONS, Hooks(should_stop=lambda step: step == 5))
    assert not any(k.startswith("average") for k in run_states(tmp_path / "run"))
    resumed = train(CONFIG, DATA, tmp_path / "run", replace(OPTIONS, resume=True))  # its header now says (0.05, 0.1)
    assert resumed.step == 24 and resumed.config.train.posthoc_ema == () and not list_snapshots(tmp_path / "run")
    model, ema = UNet(CONFIG.model), UNet(CONFIG.model)
    info = load_training_state(tmp_path / "run" / STATE_FILE, model, ema, torch.optim.AdamW(model.parameters()),
                               [UNet(CONFIG.model)])
    assert info["averages"] is False


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema") / "run"
    train(CONFIG, DATA, folder, OPTIONS)
    return folder


def test_ema_writes_the_rebuilt_weights_and_inspect_names_the_length(run, run_cli):
    result = run_cli("ema", run, "--length", "0.08")
    assert result.code == 0, result
    net, config, info = load_model(run.parent / "run-ema-0.080" / MODEL_FILE)
    expected = phema.Snapshots(run).rebuild(0.08)
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert info["ema_length"] == 0.08 and info["step"] == 24 and config == load_model(run / MODEL_FILE)[1]
    shown = run_cli("inspect", run.parent / "run-ema-0.080", "--json")
    assert json.loads(shown.out)["weights"] == "post-hoc EMA, σ_rel 0.08"
    again = run_cli("ema", run, "--length", "0.08")  # never over what is there
    assert_clean_error(again, "is there already", "--out")
    assert again.code == 2


@pytest.mark.parametrize("args, says", [
    (["--length", "0.3"], "between 0 and 0.289"),
    (["--length", "long"], "a number such as 0.05, or best"),
    (["--length", "best", "-n", "0"], "-n must be at least 1"),
])
def test_ema_refuses_bad_input_in_one_line_and_writes_nothing(run, run_cli, args, says):
    before = sorted(p.name for p in run.parent.iterdir())
    result = run_cli("ema", run, *args)
    assert_clean_error(result, says)
    assert result.code == 2 and sorted(p.name for p in run.parent.iterdir()) == before


def test_ema_of_a_run_without_snapshots_says_why(tmp_path, run_cli):
    train(replace(CONFIG, train=replace(CONFIG.train, posthoc_ema=(), steps=2)), DATA, tmp_path / "run", OPTIONS)
    result = run_cli("ema", tmp_path / "run")
    assert_clean_error(result, "no post-hoc EMA snapshots", "--posthoc-ema off")
    assert result.code == 2
    result = run_cli("ema", tmp_path)
    assert_clean_error(result, "not a run folder")
    assert result.code == 2


def test_best_keeps_the_length_of_the_lowest_fid(run, monkeypatch, tmp_path):
    """Scored by a stand-in FID (the sum of the first weight): the written model is the rebuild of the argmin."""
    from diffuse_cli import api_ema
    from diffuse_cli.training import fid_watch

    def fake_fid(self, net, config, precision, log=None, progress=None):
        return float(next(net.parameters()).detach().sum()), False

    monkeypatch.setattr(fid_watch.FidWatch, "__call__", fake_fid)
    chosen = api_ema.posthoc_ema(run, "best", tmp_path / "best", n=8)
    assert set(chosen.scores) == set(api_ema.EMA_LENGTHS) and chosen.length == min(chosen.scores, key=chosen.scores.get)
    assert chosen.trained_ema_fid is not None
    net, _, info = load_model(tmp_path / "best" / MODEL_FILE)
    expected = phema.Snapshots(run).rebuild(chosen.length)
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert info["ema_fids"] == {f"{k:g}": v for k, v in chosen.scores.items()}
