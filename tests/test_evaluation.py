"""`diffuse eval`: each number against its definition (closed forms on features with known answers) and against the
reference implementations people use (pytorch-fid, torch-fidelity, clean-fid), on the CPU in float32/float64.

The FID network itself ships in the `[eval]` extra; the tests that need it skip without it (CI installs it).
"""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from diffuse_cli.evaluation import inception, scores
from diffuse_cli.api_eval import evaluate
from diffuse_cli.images.pictures import save_png

try:
    inception.network_file()
    HAVE_NETWORK = True
except Exception:
    HAVE_NETWORK = False
needs_network = pytest.mark.skipif(not HAVE_NETWORK, reason="the FID network (pip install -e '.[eval]') is not here")


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n draws (from `seed`) of one correlated Gaussian law in d dimensions (the same law for every seed), + shift."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / d ** 0.5
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mix + shift


# -- the numbers, from features -------------------------------------------------------------------------------

def test_fid_equals_pytorch_fids_on_full_rank_covariances():
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = gaussian(400, 64, 0), gaussian(300, 64, 1, shift=0.3)
    (mu1, s1), (mu2, s2) = scores.mean_cov(a), scores.mean_cov(b)
    theirs = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert scores.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-9)
    assert np.allclose(s1.numpy(), np.cov(a.numpy(), rowvar=False))  # Σ divided by N - 1, as theirs


def test_fid_is_exact_where_the_covariance_is_singular():
    """Fewer images than features (Σ of rank 49 in 2048 dimensions): a set against itself shifted by c is ‖c‖²
    apart, because Σ₁ = Σ₂ leaves only the means; against itself, 0."""
    x = gaussian(50, 2048, 2).float()
    c = torch.linspace(-0.05, 0.05, 2048, dtype=torch.float64)
    (mu, s), (mu2, s2) = scores.mean_cov(x), scores.mean_cov(x.double() + c)
    assert torch.linalg.matrix_rank(s) == 49
    assert scores.frechet_distance(mu, s, mu2, s2) == pytest.approx(float(c @ c), rel=1e-6)
    assert scores.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)


def test_kid_is_torch_fidelitys_unbiased_mmd_and_zero_on_one_distribution():
    from torch_fidelity.metric_kid import kernel_mmd

    a, b = gaussian(120, 32, 3).float(), gaussian(120, 32, 4, shift=0.2).float()
    theirs = kernel_mmd(a.numpy().astype(np.float64), b.numpy().astype(np.float64), kid_kernel="poly",
                        kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    assert scores.mmd2(a, b) == pytest.approx(theirs, rel=1e-5)  # products in float32, as theirs on float32 features
    mean, std, size = scores.kernel_distance(a, b, subsets=10, subset_size=1000)
    assert size == 120 and mean == pytest.approx(theirs, rel=1e-5)  # a subset of all of each is the whole set
    same, spread, _ = scores.kernel_distance(gaussian(2000, 32, 5), gaussian(2000, 32, 6), subsets=20,
                                             subset_size=500)
    assert abs(same) < 3 * spread and mean > 10 * spread  # unbiased: 0 on average when the laws are equal


def test_precision_and_recall_are_torch_fidelitys_and_their_definition():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = gaussian(300, 16, 7).float(), gaussian(200, 16, 8, shift=0.4).float()
    theirs = calculate_precision_recall_full(fake, real, 3)  # their convention: generated first
    assert scores.precision_recall(real, fake, 3, chunk=64) == pytest.approx(theirs, abs=1e-6)  # theirs: a float32 mean
    assert scores.precision_recall(real, real) == (1.0, 1.0)
    assert scores.precision_recall(real, real + 100) == (0.0, 0.0)
    plane = gaussian(400, 2, 7).float()  # samples from a quarter of the data: all plausible, a quarter covered
    quarter = plane[plane[:, 0] > plane[:, 0].quantile(0.75)]
    precision, recall = scores.precision_recall(plane, quarter)
    assert precision == 1.0 and 0.25 <= recall < 0.4  # (each ball reaches a little past the quarter's edge)


def test_an_exact_training_image_among_the_samples_is_a_copy_and_noise_is_not():
    g = torch.Generator().manual_seed(9)
    reference = (torch.rand(60, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    samples = (torch.rand(10, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    samples[3] = reference[17]
    samples[5] = (reference[40].int() + torch.randint(-2, 3, (3, 16, 16), generator=g)).clamp(0, 255).to(torch.uint8)
    found = scores.copies(samples, reference)
    assert found.copied.tolist() == [i in (3, 5) for i in range(10)]
    assert found.nearest[3] == 17 and found.ratio[3] == 0 and found.nearest[5] == 40


# -- bringing images to the network ------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [28, 64, 300])
def test_tf_resize_is_torch_fidelitys_tensorflow_compatible_bilinear(side):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(2, 3, side, side + 3, generator=torch.Generator().manual_seed(side)) * 255
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.allclose(inception.tf_bilinear(x, 299), theirs, atol=1e-4)


@pytest.mark.parametrize("side", [28, 64, 300])
def test_clean_resize_is_clean_fids_pil_bicubic(side):
    from cleanfid.resize import make_resizer

    x = (torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(side)) * 255).to(torch.uint8)
    theirs = make_resizer("PIL", False, "bicubic", (299, 299))(x[0].permute(1, 2, 0).numpy())
    assert np.allclose(inception.pil_bicubic(x, 299)[0].permute(1, 2, 0).numpy(), theirs, atol=1e-4)


def test_grayscale_reaches_the_network_as_three_equal_channels():
    gray = (torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    for resize in ("tf", "pytorch", "clean"):
        assert torch.equal(inception.network_input(gray, resize), inception.network_input(gray.expand(-1, 3, -1, -1),
                                                                                          resize))


# -- the network -------------------------------------------------------------------------------------------------

def convs_of_pytorch_fid(net: torch.nn.Module) -> list[torch.nn.Module]:
    """pytorch-fid's BasicConv2d layers (conv + batch norm), in the order the TensorFlow graph has them."""
    return [m for m in net.modules() if type(m).__name__ == "BasicConv2d"]


def convs_of_ours(script: torch.nn.Module) -> list[str]:
    """The TorchScript network's conv layers (weight, beta, mean, var), by name prefix, in the graph's order."""
    return [k[:-len(".weight")] for k in script.state_dict() if k.endswith(".weight")]


def pytorch_fid_network(state: dict[str, torch.Tensor] | None, monkeypatch, **options) -> torch.nn.Module:
    """pytorch-fid's own FID Inception, its weights "downloaded" from `state` (offline: its loader pointed at it)."""
    from pytorch_fid import inception as pf

    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *args, **kwargs: state)
    return pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], **options).eval()


def random_fid_inception(monkeypatch) -> dict[str, torch.Tensor]:
    """Random weights in pytorch-fid's FID Inception layout: its own initialisation, with every batch norm's
    statistics measured on random images (so activations keep their scale) and γ = 1, as the TensorFlow graph has
    no scale."""
    from pytorch_fid import inception as pf

    def built_without_weights(*args, **kwargs):
        raise LookupError
    monkeypatch.setattr(pf, "load_state_dict_from_url", built_without_weights)
    torch.manual_seed(0)
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pf.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pf.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pf.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pf.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pf.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pf.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pf.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pf.FIDInceptionE_1(1280)), ("Mixed_7c", pf.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum, m.affine = None, True  # a cumulative average over the calibration batch
            torch.nn.init.ones_(m.weight)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 299, 299, generator=torch.Generator().manual_seed(1)))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def map_into(script: torch.nn.Module, fid_net: torch.nn.Module) -> None:
    """pytorch-fid's weights into the TorchScript network, layer for layer (both follow the TensorFlow graph)."""
    theirs, ours = convs_of_pytorch_fid(fid_net), convs_of_ours(script)
    assert len(theirs) == len(ours) == 94
    state = {}
    for layer, name in zip(theirs, ours):
        assert torch.allclose(layer.bn.weight, torch.ones_like(layer.bn.weight))  # no γ in the graph
        state.update({f"{name}.weight": layer.conv.weight, f"{name}.beta": layer.bn.bias,
                      f"{name}.mean": layer.bn.running_mean, f"{name}.var": layer.bn.running_var})
    script.load_state_dict(state)


def fresh_network() -> torch.nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(inception.network_file())).eval()


@needs_network
def test_our_network_computes_pytorch_fids_features_with_the_same_weights(monkeypatch):
    """Random weights built in pytorch-fid's own FID Inception, saved, loaded into ours: the same pool_3 features,
    through pytorch-fid's resize and input scaling (our `pytorch` mode), and the same FID from both."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    state = random_fid_inception(monkeypatch)
    theirs_net = pytorch_fid_network(state, monkeypatch)  # resize_input and normalize_input: its defaults
    ours_net = fresh_network()
    map_into(ours_net, theirs_net)
    images = (torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    with torch.no_grad():
        theirs = theirs_net(images.float() / 255)[0].flatten(1)
        ours = ours_net(inception.network_input(images, "pytorch"))
    assert theirs.abs().mean() > 1e-2  # the features are not vanishing: the comparison means something
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())
    fid = lambda f: calculate_frechet_distance(*[t.numpy() for t in scores.mean_cov(f[:3].double())],  # noqa: E731
                                               *[t.numpy() for t in scores.mean_cov(f[3:].double())])
    assert scores.frechet_distance(*scores.mean_cov(ours[:3]), *scores.mean_cov(ours[3:])) == \
        pytest.approx(fid(theirs), rel=1e-4)


@pytest.fixture(scope="module")
def real_features():
    """The real network's features of 16 built-in shapes, and of the same shapes blurred more and more."""
    if not HAVE_NETWORK:
        pytest.skip("the FID network (pip install -e '.[eval]') is not here")
    from diffuse_cli.images.shapes import render_shapes

    images = render_shapes(16, 32, seed=4)

    def blurred(sigma: float) -> torch.Tensor:
        r = torch.arange(-4, 5, dtype=torch.float32)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).view(1, 1, 1, 9).expand(3, 1, 1, 9)
        x = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode="replicate")
        x = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)
        return x.round().clamp(0, 255).to(torch.uint8)
    return images, [inception.features(x) for x in [images] + [blurred(s) for s in (0.7, 1.5, 3.0)]]


def test_fid_of_a_set_against_itself_is_zero_and_rises_with_blur(real_features):
    _, feats = real_features
    stats = [scores.mean_cov(f) for f in feats]
    assert scores.frechet_distance(*stats[0], *stats[0]) == pytest.approx(0, abs=1e-6)
    fids = [scores.frechet_distance(*stats[0], *s) for s in stats[1:]]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_our_pytorch_mode_is_pytorch_fid_with_the_real_weights(real_features, monkeypatch):
    """The real network's weights mapped into pytorch-fid's layout: pytorch-fid computes our `pytorch` features."""
    images, _ = real_features
    ours_net = fresh_network()
    layers = dict(zip(convs_of_ours(ours_net), range(94)))
    state = ours_net.state_dict()
    theirs_net = pytorch_fid_network(random_fid_inception(monkeypatch), monkeypatch)
    for layer, name in zip(convs_of_pytorch_fid(theirs_net), layers):
        layer.conv.weight.data.copy_(state[f"{name}.weight"])
        layer.bn.bias.data.copy_(state[f"{name}.beta"])
        layer.bn.running_mean.copy_(state[f"{name}.mean"])
        layer.bn.running_var.copy_(state[f"{name}.var"])
    with torch.no_grad():
        theirs = theirs_net(images[:4].float() / 255)[0].flatten(1)
    ours = inception.features(images[:4], "pytorch")
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())


# -- folders, the cache, the command -----------------------------------------------------------------------------

def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, folder / f"{i:03d}.png")


@needs_network
def test_reference_features_are_cached_outside_the_folder_and_never_served_stale(tmp_path):
    from diffuse_cli.images.shapes import render_shapes

    write_images(tmp_path / "ref", render_shapes(6, 16, seed=1))
    write_images(tmp_path / "samples", render_shapes(4, 16, seed=2))
    before = sorted(p.name for p in (tmp_path / "ref").iterdir())
    first = evaluate(tmp_path / "samples", tmp_path / "ref", cache=tmp_path / "cache")
    again = evaluate(tmp_path / "samples", tmp_path / "ref", cache=tmp_path / "cache")
    assert not first.cached and again.cached and again.scores == first.scores
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == before  # nothing written into the data
    save_png(render_shapes(1, 16, seed=3)[0], tmp_path / "ref" / "002.png")  # one image replaced
    changed = evaluate(tmp_path / "samples", tmp_path / "ref", cache=tmp_path / "cache")
    assert not changed.cached and changed.scores.fid != first.scores.fid


@needs_network
def test_eval_prints_exactly_the_documented_json_and_counts_a_copied_training_image(tmp_path, run_cli):
    from diffuse_cli.images.shapes import render_shapes

    reference = render_shapes(8, 16, seed=5)
    write_images(tmp_path / "ref", reference)
    write_images(tmp_path / "samples", torch.cat([reference[3:4], render_shapes(3, 16, seed=6)]))
    result = run_cli("eval", tmp_path / "samples", tmp_path / "ref", "--json", "--cache-dir", tmp_path / "cache",
                     "--copies", tmp_path / "pairs.png")
    assert result.code == 0, result
    said = json.loads(result.out)
    assert set(said) == {"fid", "kid", "precision", "recall", "copies", "n_samples", "n_reference", "resize"}
    assert set(said["kid"]) == {"mean", "std"} and said["copies"] == {"count": 1, "of": 4}
    assert (said["n_samples"], said["n_reference"], said["resize"]) == (4, 8, "tf")
    assert (tmp_path / "pairs.png").exists()


@needs_network
def test_eval_of_a_run_draws_its_samples_with_the_sampler_named(tmp_path, run_cli):
    """`--sampler ddim --steps 3`: the images scored are exactly Model.sample's with those settings (CPU, fp32), and
    not the default sampler's."""
    import diffuse_cli as diffuse
    from diffuse_cli.images.decode import read_image
    from diffuse_cli.images.shapes import render_shapes

    write_images(tmp_path / "shapes", render_shapes(8, 16, seed=1))
    diffuse.train(tmp_path / "shapes", out=tmp_path / "run", preset="tiny", steps=2, batch_size=4, device="cpu")
    result = run_cli("eval", tmp_path / "run", "-n", "3", "--sampler", "ddim", "--steps", "3", "--out",
                     tmp_path / "drawn", "--cache-dir", tmp_path / "cache", "--copies", tmp_path / "pairs.png",
                     "--device", "cpu")
    assert result.code == 0, result
    drawn = torch.stack([read_image(f) for f in sorted((tmp_path / "drawn").glob("[0-9]*.png"))])
    model = diffuse.load(tmp_path / "run", device="cpu")
    assert torch.equal(drawn, model.sample(3, sampler="ddim", steps=3))
    assert not torch.equal(drawn, model.sample(3))


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, run_cli, monkeypatch):
    from diffuse_cli.images.shapes import render_shapes

    monkeypatch.chdir(tmp_path)  # where copies.png would go
    write_images(tmp_path / "one", render_shapes(1, 16))
    write_images(tmp_path / "two", render_shapes(2, 16))
    cases = [(["nope", "two"], "no such"), (["one", "two"], "at least 2"), (["two", "one"], "at least 2"),
             (["two"], "name the reference"), (["two", "two", "--resize", "bilinear"], "--resize"),
             (["two", "two", "--precision", "fp8"], "--precision"), (["two", "two", "--copies", "c.jpg"], "PNG"),
             (["two", "two", "-n", "5"], "-n applies to a run"),
             (["two", "two", "--sampler", "ddim"], "--sampler applies to a run"),
             (["two", "two", "--sampler", "euler"], "unknown sampler"), (["two", "two", "--steps", "0"], "--steps")]
    real = importlib.metadata.distribution

    def without_the_extra(name):
        if name == inception.WHEEL:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    for args, words in cases + [(["two", "two"], "pip install")]:
        if words == "pip install":
            monkeypatch.setattr(importlib.metadata, "distribution", without_the_extra)
        before = sorted(p.name for p in tmp_path.rglob("*"))
        result = run_cli("eval", *args)
        assert result.code == 2 and words in result.err and len(result.err.strip().splitlines()) == 1, (args, result)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, args


@needs_network
def test_training_with_eval_every_records_fid_and_keeps_the_best_weights(tmp_path):
    """FID every 2 steps: in metrics.jsonl, under the loss in loss.png, and the best weights beside the last."""
    import diffuse_cli as diffuse
    from PIL import Image

    from diffuse_cli.images.shapes import render_shapes
    from diffuse_cli.training.run_folder import read_metrics

    diffuse.train(render_shapes(8, 16, seed=1), out=tmp_path / "run", preset="tiny", steps=4, batch_size=4,
                  eval_every=2, eval_n=4, device="cpu")
    fids = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "fid" in r]
    assert [(r["step"], r["fid_samples"]) for r in fids] == [(2, 4), (4, 4)] and all(r["fid"] > 0 for r in fids)
    best = diffuse.inspect(tmp_path / "run" / "model_best.safetensors")[0]
    assert best["fid"] == min(r["fid"] for r in fids)
    assert Image.open(tmp_path / "run" / "loss.png").height == 3 * 230  # loss, learning rate, FID


def test_eval_every_without_the_network_stops_before_any_work(tmp_path, monkeypatch):
    import diffuse_cli as diffuse

    from diffuse_cli.errors import UsageError
    from diffuse_cli.images.shapes import render_shapes

    monkeypatch.setattr(inception.importlib.metadata, "distribution",
                        lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(UsageError, match="pip install"):
        diffuse.train(render_shapes(4, 16), out=tmp_path / "run", preset="tiny", steps=2, eval_every=1)
    assert not (tmp_path / "run").exists()


@needs_network
def test_eval_every_scores_each_post_hoc_ema_length_rebuilt_at_that_step(tmp_path):
    """--eval-ema: at each FID step, the post-hoc EMA of each length is rebuilt from the snapshots and scored; the
    record keeps every length's FID and the best, model_best.safetensors the best length's weights (CPU, fp32)."""
    import diffuse_cli as diffuse

    from diffuse_cli.formats.checkpoint import load_model
    from diffuse_cli.images.data import ImageData
    from diffuse_cli.images.shapes import render_shapes
    from diffuse_cli.training.fid_watch import FidWatch
    from diffuse_cli.training.posthoc_ema import Snapshots
    from diffuse_cli.training.run_folder import read_metrics

    images = render_shapes(8, 16, seed=1)
    diffuse.train(images, out=tmp_path / "run", preset="tiny", steps=4, batch_size=4, eval_every=2, eval_n=4,
                  eval_ema=(0.05, 0.2), precision="fp32", device="cpu")
    fids = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4]
    for r in fids:
        assert set(r["fid_by_length"]) == {"0.05", "0.2"} and r["fid"] == min(r["fid_by_length"].values())
        assert r["fid_by_length"][f"{r['ema_length']:g}"] == r["fid"]
    last = fids[-1]  # step 4's snapshot is the run's last, so its lengths can be rebuilt and scored again here
    snaps, net = Snapshots(tmp_path / "run"), load_model(tmp_path / "run" / "model.safetensors", "cpu")[0]
    watch = FidWatch(ImageData.from_tensor(images), 4, torch.device("cpu"))
    for length in (0.05, 0.2):
        net.load_state_dict(snaps.rebuild(length))
        assert watch(net.eval(), snaps.config, "fp32")[0] == pytest.approx(last["fid_by_length"][f"{length:g}"],
                                                                           rel=1e-6)
    best = diffuse.inspect(tmp_path / "run" / "model_best.safetensors")[0]
    overall = min(fids, key=lambda r: r["fid"])
    assert best["fid"] == overall["fid"] and best["ema_length"] == overall["ema_length"] and \
        best["step"] == overall["step"]


@pytest.mark.parametrize("settings, says", [({"eval_ema": (0.1,)}, "eval_every"),
                                            ({"eval_ema": (0.5,), "eval_every": 1}, "between 0 and"),
                                            ({"eval_ema": (0.1,), "eval_every": 1, "posthoc_ema": ()}, "off"),
                                            ({"eval_ema": (0.1,), "eval_every": 1, "out": None}, "run folder")])
def test_eval_ema_that_cannot_be_scored_is_refused_before_any_work(tmp_path, settings, says):
    import diffuse_cli as diffuse

    from diffuse_cli.errors import UsageError
    from diffuse_cli.images.shapes import render_shapes

    settings = {"out": tmp_path / "run", **settings}
    with pytest.raises(UsageError, match=says):
        diffuse.train(render_shapes(4, 16), preset="tiny", steps=2, device="cpu", **settings)
    assert not (tmp_path / "run").exists()
