"""diffusers' folders in and out, against diffusers itself: the same outputs, the same DDPM images, a lossless
round trip. The UNet2DModels are built from the configs of the published DDPM checkpoints (their weights
cannot be downloaded here), with random weights in every layer, so that no mapping hides behind a zero."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffuse_cli as diffuse
from diffuse_cli.formats.diffusers_format import OURS, WEIGHTS
from diffuse_cli.errors import DiffuseError
from diffuse_cli.network import fast_ops
from diffuse_cli.diffusion.objectives import as_eps_model
from diffuse_cli.diffusion.samplers import sample
from diffuse_cli.diffusion.schedule import NoiseSchedule

from .conftest import assert_clean_error

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[test]'")

# google/ddpm-cifar10-32 and google/ddpm-{celebahq,church,bedroom}-256 (Ho et al.'s, converted), and the network of
# diffusers' examples/unconditional_image_generation/train_unconditional.py (at its default 64x64, diffusers' defaults)
DDPM_CIFAR10 = dict(sample_size=32, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
                    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
                    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
                    in_channels=3, out_channels=3)
DDPM_256 = {**DDPM_CIFAR10, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
            "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
TRAIN_UNCONDITIONAL = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=[128, 128, 256, 256, 512, 512],
                           down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                           up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
SMALL_DDPM = {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1,
              "down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}


def randomised(config: dict, seed: int = 0):
    """A UNet2DModel with every weight random: N(0, 1/fan_in) matrices, biases N(0, 0.1), norms 1 + N(0, 0.1)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            else:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def save_pipeline(model, folder, **scheduler):
    model.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(**{"num_train_timesteps": 1000, "beta_schedule": "linear", **scheduler}).save_pretrained(
        folder / "scheduler")
    return folder


def assert_same_outputs(theirs, ours, size: int, channels: int = 3, labels=None, batch: int = 2):
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    for t in (0, 1, 500, 999):
        tt = torch.full((batch,), t)
        with torch.no_grad():
            a = theirs(x, tt, class_labels=labels).sample
            b = ours(x, tt, labels)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (t, (a - b).abs().max().item(), a.abs().max().item())


@pytest.mark.parametrize("config", [DDPM_CIFAR10, TRAIN_UNCONDITIONAL, DDPM_256], ids=["ddpm-cifar10-32",
                                                                                       "train_unconditional-64",
                                                                                       "ddpm-256"])
def test_imported_networks_compute_what_unet2dmodel_computes(config, tmp_path):
    theirs = randomised(config)
    model = diffuse.import_diffusers(save_pipeline(theirs, tmp_path / "pipe"), device="cpu")
    assert model.config.diffusion.schedule == "linear" and model.config.diffusion.objective == "eps"
    # at most 64x64: both networks fix their layers (attention's levels included) from the config, not from the
    # input, so a 256-px network's every layer is compared at a sixteenth of the cost
    assert_same_outputs(theirs, model.net, min(config["sample_size"], 64))
    if config is DDPM_CIFAR10:
        assert model.config.preset == "ddpm-cifar10"  # Ho et al.'s network is our preset


def test_weights_saved_before_diffusers_renamed_its_attention_import_the_same(tmp_path):
    theirs = randomised(SMALL_DDPM)
    folder = save_pipeline(theirs, tmp_path / "pipe")
    weights = load_file(folder / "unet" / WEIGHTS)
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in weights.items()}
    save_file(old, folder / "unet" / WEIGHTS)
    assert_same_outputs(theirs, diffuse.import_diffusers(folder, device="cpu").net, 16)


def test_ddpm_images_through_diffusers_scheduler_and_our_sampler_are_the_same(tmp_path, monkeypatch):
    """CPU, float32, both networks by direct convolutions: what differs is the sampler alone (Winograd's own
    rounding, ~1e-5 of the largest a call, is tests/test_fast_ops.py's to hold)."""
    monkeypatch.setattr(fast_ops, "WINOGRAD", False)
    theirs = randomised(SMALL_DDPM)
    model = diffuse.import_diffusers(save_pipeline(theirs, tmp_path / "pipe"), device="cpu")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing")
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(theirs(x, t).sample, t, x, generator=g).prev_sample
        schedule = NoiseSchedule.make("linear", 1000)
        eps_model = as_eps_model(lambda x_t, t: model.net(x_t, t), schedule, "eps")
        ours = sample(eps_model, (2, 3, 16, 16), schedule, "ddpm", 5, torch.Generator().manual_seed(3))
    assert (ours - x).abs().max() < 1e-4, (ours - x).abs().max()


@pytest.mark.parametrize("schedule,objective", [("cosine", "v"), ("linear", "eps"), ("sigmoid", "x0")])
def test_export_loads_in_diffusers_without_a_warning_and_computes_the_same(tmp_path, schedule, objective):
    model = diffuse.train(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), steps=2, batch_size=4, warmup=1,
                          base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                          head_channels=32, schedule=schedule, objective=objective, precision="fp32")
    folder = diffuse.export_diffusers(model, tmp_path / "out")
    theirs, loading = diffusers.UNet2DModel.from_pretrained(folder / "unet", output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    assert_same_outputs(theirs.eval(), model.net, 16)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    ours = NoiseSchedule.make(schedule, 1000)
    assert torch.allclose(scheduler.alphas_cumprod.double(), ours.alpha_bar, rtol=1e-5, atol=1e-7)
    assert scheduler.config.prediction_type == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[objective]
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)

    back = diffuse.import_diffusers(folder, device="cpu")  # ours -> diffusers -> ours: bit for bit
    assert back.config == model.config
    for (name, a), b in zip(model.net.state_dict().items(), back.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_conditional_model_exports_with_its_class_embedding(tmp_path):
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    data = diffuse.ImageData.from_tensor(images, torch.tensor([0, 1] * 4), ("cat", "dog"))
    model = diffuse.train(data, steps=2, batch_size=4, warmup=1, base_channels=32, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(8,), head_channels=32, precision="fp32")
    folder = diffuse.export_diffusers(model, tmp_path / "out")
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    assert theirs.config.num_class_embeds == 3  # cat, dog, and "no class"
    assert_same_outputs(theirs, model.net, 16, labels=torch.tensor([1, 2]))
    assert diffuse.import_diffusers(folder, device="cpu").config.model.class_names == ("cat", "dog")


def test_cli_imports_samples_inspects_and_exports_and_refuses_what_it_cannot_represent(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = save_pipeline(randomised(SMALL_DDPM), tmp_path / "ddpm-small")
    result = run_cli("import", "ddpm-small")
    assert result.code == 0 and "checkpoints/ddpm-small/model.safetensors" in result.out, result
    assert run_cli("sample", "-n", "2", "--steps", "3").code == 0
    inspected = run_cli("inspect", "checkpoints/ddpm-small")
    assert "imported from" in inspected.out and "ddpm-small" in inspected.out, inspected
    assert run_cli("export", "checkpoints/ddpm-small", "exported").code == 0
    assert (tmp_path / "exported" / "unet" / WEIGHTS).is_file() and (tmp_path / "exported" / OURS).is_file()
    assert run_cli("export", "checkpoints/ddpm-small", "--out", "as-option").code == 0  # as import takes its folder
    assert (tmp_path / "as-option" / "unet" / WEIGHTS).is_file()

    bin_only = tmp_path / "bin-only"
    (bin_only / "unet").mkdir(parents=True)
    (bin_only / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
    (bin_only / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    fourier = save_pipeline(randomised(SMALL_DDPM), tmp_path / "fourier")
    text = (fourier / "unet" / "config.json").read_text().replace('"positional"', '"fourier"')
    (fourier / "unet" / "config.json").write_text(text)
    no_scheduler = tmp_path / "no-scheduler"
    (no_scheduler / "unet").mkdir(parents=True)
    for name in ("config.json", WEIGHTS):
        (no_scheduler / "unet" / name).write_bytes((folder / "unet" / name).read_bytes())
    latent = tmp_path / "stable-diffusion"  # judged by its config, before its (here garbage) weights are read
    (latent / "unet").mkdir(parents=True)
    (latent / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "sample_size": 64}')
    (latent / "unet" / WEIGHTS).write_bytes(b"not read")
    (latent / "scheduler").mkdir()
    (latent / "scheduler" / "scheduler_config.json").write_text((folder / "scheduler" / "scheduler_config.json").read_text())
    diffuse.train(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), out=tmp_path / "checkpoints" / "small",
                  steps=1, batch_size=4, warmup=1, preset="small", precision="fp32")
    for args, words in ((["import", "bin-only"], ["runs code", "safe_serialization"]),
                        (["import", "fourier"], ["time_embedding_type", "fourier"]),
                        (["import", "no-scheduler"], ["scheduler"]),
                        (["import", "stable-diffusion"], ["_class_name", "UNet2DConditionModel"]),
                        (["import", "nowhere"], ["no such folder"]),
                        (["import", "ddpm-small"], ["already holds a model"]),
                        (["export", "checkpoints/small", "small-out"], ["GroupNorm", "32"]),
                        (["export", "checkpoints/ddpm-small", "exported"], ["not an empty folder"]),
                        (["export", "checkpoints/ddpm-small"], ["give the diffusers folder to write"]),
                        (["export", "checkpoints/ddpm-small", "a", "--out", "b"], ["two folders to write"])):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        result = run_cli(*args)
        assert result.code == 2, (args, result)
        assert_clean_error(result, *words)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before, args  # nothing written


def test_our_own_models_keep_todays_conventions(tmp_path):
    model = diffuse.train(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), steps=1, preset="tiny", batch_size=4,
                          warmup=1, precision="fp32")
    m = model.config.model
    assert (m.norm_eps, m.time_freq_shift, m.time_cos_first, m.downsample_padding) == (1e-5, 0.0, False, 1)
    with pytest.raises(DiffuseError, match="no such folder"):
        diffuse.import_diffusers(tmp_path / "nothing")


@pytest.mark.parametrize("file, text, words", [
    ("unet/config.json", "[1, 2]", ["config.json", "not a JSON object"]),
    ("unet/config.json", "{not json", ["config.json", "cannot read it as JSON"]),
    ("unet/config.json", {"layers_per_block": "two"}, ["config field cannot be read"]),
    ("unet/config.json", {"block_out_channels": [32, "x"]}, ["config field cannot be read"]),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": "many"}, ["num_train_timesteps", "not a count"]),
    ("scheduler/scheduler_config.json", {"beta_start": "low"}, ["config field cannot be read"]),
    (OURS, "[]", [OURS, "not a JSON object"]),
    (OURS, {"config": {"model": {"image_size": "x"}}}, [OURS, "not a config diffuse wrote", "remove it"]),
    (OURS, {"info": {}}, [OURS, "not a config diffuse wrote"]),
], ids=["unet-list", "unet-not-json", "unet-field-type", "unet-channel-type", "scheduler-steps-type",
                                                                                      "scheduler-field-type", "ours-list",
        "ours-field-type", "ours-no-config"])
def test_a_malformed_config_is_one_line_and_exit_2_and_nothing_is_written(run_cli, tmp_path, monkeypatch, file, text,
                                                                            words):
    monkeypatch.chdir(tmp_path)
    folder = save_pipeline(randomised(SMALL_DDPM), tmp_path / "ddpm")
    path = folder / file
    if isinstance(text, dict):  # a field of the wrong type in an otherwise sound file
        base = json.loads(path.read_text()) if path.is_file() else {}
        text = json.dumps({**base, **text})
    path.write_text(text)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = run_cli("import", "ddpm")
    assert result.code == 2, result
    assert_clean_error(result, *words)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_model_whose_attention_level_never_occurs_exports_and_imports_back(tmp_path):
    """tiny before its shape scaled named attention at 4x4, which a 16-px image with two levels never reaches (such
    checkpoints exist); diffusers' config lists only the layers there are, and our config beside it names the one
    that is not: the same network either way."""
    import diffuse_cli as diffuse

    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = diffuse.train(images, preset="tiny", steps=1, device="cpu", base_channels=32, head_channels=32,
                          norm_group_min=1, channel_mult=(1, 2), attention_resolutions=(4,), precision="fp32")
    assert model.config.model.image_size == 16 and model.config.model.attention_resolutions == (4,)
    diffuse.export_diffusers(model, tmp_path / "out")
    back = diffuse.import_diffusers(tmp_path / "out", device="cpu")
    assert back.config == model.config
    for (name, a), b in zip(model.net.state_dict().items(), back.net.state_dict().values()):
        assert torch.equal(a, b), name
    # the outputs to rounding: an fp32 run trains channels_last on the CPU, and the import loads contiguous weights
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(back.net(x, t), model.net(x, t), rtol=1e-5, atol=1e-6)


def test_a_distilled_student_exports_as_a_ddim_pipeline_that_samples_as_diffuse_does(tmp_path, image_folder):
    """A student samples by DDIM at its trailing steps, into the clean image, x̂_0 unclipped: the folder names
    DDIMPipeline and a DDIMScheduler set so, and its steps from one x_T land where ours do (fp32, CPU)."""
    from diffuse_cli.diffusion.denoiser import Denoiser
    from diffuse_cli.diffusion.samplers import ddim, spaced_timesteps

    shape = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=32)
    diffuse.train(image_folder, tmp_path / "teacher", steps=2, batch_size=4, warmup=1, precision="fp32", image_size=16,
                  channels=3, **shape)  # a folder: a distillation trains on its teacher's images
    student = diffuse.distill(tmp_path / "teacher", tmp_path / "student", steps=2, train_steps=2, batch_size=4,
                              precision="fp32", device="cpu")
    folder = diffuse.export_diffusers(student, tmp_path / "out")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    pipeline = diffusers.DDIMPipeline.from_pretrained(folder)
    pipeline.scheduler.set_timesteps(2)
    schedule = NoiseSchedule.make("cosine", 1000)
    steps = spaced_timesteps(schedule, 2, "trailing")
    assert pipeline.scheduler.timesteps.tolist() == steps.tolist()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    theirs = x.clone()
    with torch.no_grad():
        for t in pipeline.scheduler.timesteps:
            theirs = pipeline.scheduler.step(pipeline.unet(theirs, t).sample, t, theirs, eta=0.0).prev_sample
        ours = ddim(Denoiser(student.net.cpu(), student.config, "fp32").eps_model(2), x, schedule, steps)
    # Ours takes the v-network's x̂_0 to ε̂ and back (the samplers' one contract is ε); at ᾱ_999 = 2.4e-9 that trip
    # multiplies float32's rounding of ε̂ by 1/α = 2e4: about 1e-3, an eighth of one uint8 level of the image.
    assert (ours - theirs).abs().max() < 3e-3, (ours - theirs).abs().max()
    clipped = ddim(Denoiser(student.net.cpu(), replace(student.config, distill=None), "fp32").eps_model(2), x,
                   schedule, steps)
    assert (clipped - theirs).abs().max() > 10 * (ours - theirs).abs().max()  # a clipping sampler would not agree
