"""A training step's memory: the estimate made before the first step, the micro-batches a batch too large is split
into, and --checkpointing, which recomputes what it does not keep and so must give the same gradients.
On the CPU in fp32 unless a test says otherwise (the GPU check is skipped where CUDA is absent)."""

from dataclasses import replace

import pytest
import torch

from diffuse_cli.config import Config, TrainConfig
from diffuse_cli.presets import model_config
from diffuse_cli.diffusion.objectives import diffusion_loss
from diffuse_cli.diffusion.schedule import NoiseSchedule
from diffuse_cli.errors import TrainingFailed
from diffuse_cli.formats.checkpoint import load_model
from diffuse_cli.formats.files import MODEL_FILE
from diffuse_cli.images.data import load_builtin
from diffuse_cli.network.unet import UNet
from diffuse_cli.training import loop
from diffuse_cli.training.distributed import World
from diffuse_cli.training.loop import Hooks, Options, train
from diffuse_cli.training.memory import StepMemory, fit_batch, step_memory

CONFIG = Config(preset="tiny", model=model_config("tiny", image_size=8, dropout=0.2, class_names=("a", "b")),
                train=TrainConfig(batch_size=8, steps=2, precision="fp32"))
DATA = load_builtin(8, n=16).without_classes()  # every image "no class"
ONE = World(0, 1, 0, 1)


def gradients(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = UNet(CONFIG.model).train()
    model.checkpointing = checkpointing
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t, labels = torch.tensor([3, 300, 600, 999]), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(2)  # dropout's draws: recomputation must replay them
    loss = diffusion_loss(model, "v", NoiseSchedule.make("cosine"), x0, t, eps, 5.0, labels)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_checkpointing_gives_the_same_loss_and_gradients_to_rounding():
    """With dropout on and a class embedding, so that a recomputation that drew new masks would show."""
    (loss, grads), (loss_ckpt, grads_ckpt) = gradients(False), gradients(True)
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_checkpointing_keeps_less_per_image_and_the_same_fixed_part():
    config = Config(model=model_config("small", image_size=32))
    model = UNet(config.model)
    plain, ckpt = (step_memory(model, config, "fp32", c) for c in (False, True))
    assert ckpt.saved_per_image < 0.6 * plain.saved_per_image and ckpt.fixed == pytest.approx(plain.fixed, rel=0.01)


def test_the_fixed_part_is_the_optimizer_state_of_every_parameter():
    """Weights, gradients, AdamW's two moments and the EMA: 20 bytes a parameter; what else a forward keeps whatever
    the batch (the time code's frequencies, say) is a few percent beside it."""
    from diffuse_cli.training.memory import WORKSPACE

    model = UNet(CONFIG.model)
    params = sum(p.numel() for p in model.parameters())
    memory = step_memory(model, CONFIG, "fp32")
    assert 20 * params <= memory.fixed - WORKSPACE < 1.05 * 20 * params


@pytest.mark.parametrize("batch, available, micro", [(12, 10_000, 12), (12, 3_000, 4), (12, 1_500, 1),
                                                     (7, 3_000, 1), (12, 1_000, None)])
def test_the_micro_batch_is_the_largest_divisor_that_fits(batch, available, micro):
    memory = StepMemory(fixed=1000, saved_per_image=200, inputs_per_image=50)  # 250 an image with the transient;
    # 90% of `available` is planned on
    assert memory.fitting_batch(batch, available) == micro


def test_a_batch_too_large_trains_in_micro_batches_with_the_same_effective_batch(tmp_path, monkeypatch):
    model = UNet(CONFIG.model)
    memory = step_memory(model, CONFIG, "fp32")
    room = memory.need(2) / 0.9 + 1  # two images fit, three do not
    monkeypatch.setattr(loop, "device_memory_available", lambda device: room - 4 * sum(
        p.numel() for p in model.parameters()))
    logs = []
    result = train(CONFIG, DATA, tmp_path, Options(save_every=100, sample_every=100, grid_steps=2),
                   Hooks(log=logs.append))
    said = [m for m in logs if "micro-batches" in m]
    assert said == [f"note: a step of batch 8 at 8x8 needs about {memory.need(8) / 2**30:.1f} GB and memory has "
                    f"{room / 2**30:.1f} GB free: training in 4x more micro-batches of 2 (gradient accumulation), "
                    "the same effective batch of 8; checkpointing fits more"]  # as the API words it; the CLI: --checkpointing
    _, saved, info = load_model(tmp_path / MODEL_FILE)
    assert (saved.train.batch_size, saved.train.grad_accum) == (2, 4) == (result.config.train.batch_size,
                                                                         result.config.train.grad_accum)
    assert info["images_seen"] == 2 * 8


def test_not_even_one_image_fitting_stops_before_the_first_step_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "device_memory_available", lambda device: 1000)
    with pytest.raises(TrainingFailed, match=r"^a training step of one 8x8 image needs about .* GB and memory has "
                                             r".* GB free; try checkpointing, a smaller image_size or preset$"):
        train(CONFIG, DATA, tmp_path, Options())
    assert not (tmp_path / MODEL_FILE).exists()


def test_fit_batch_multiplies_the_accumulation_already_asked_and_keeps_the_effective_batch():
    model = UNet(CONFIG.model)
    memory = step_memory(model, CONFIG, "fp32")
    config = replace(CONFIG, train=replace(CONFIG.train, batch_size=8, grad_accum=3))
    fitted, note = fit_batch(config, model, "fp32", False, ONE, int(memory.need(4) / 0.9) + 1)
    assert (fitted.train.batch_size, fitted.train.grad_accum) == (4, 6) and "2x more" in note


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_a_gpu_the_estimate_is_within_15_percent_of_the_measured_peak(precision):
    """CUDA, the given precision: the allocator's peak over real steps of `diffuse train`'s own step."""
    from diffuse_cli.network.device import memory_format
    from diffuse_cli.training.step import StepTensors, make_optimizer, optimizer_step

    device = torch.device("cuda")
    config = Config(preset="small", model=model_config("small", image_size=64),
                    train=TrainConfig(batch_size=32, precision=precision))
    model = UNet(config.model).to(device, memory_format=memory_format(device, precision))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()  # the weights, which the estimate counts
    import copy

    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, config.train, capturable=False)
    io = StepTensors.allocate(config, 32, device, memory_format(device, precision))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(3):
        optimizer_step(model, model, ema, optimizer, scaler, config, NoiseSchedule.make("cosine"), precision, io)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start + sum(p.numel() * 4 for p in model.parameters())
    estimate = step_memory(model, config, precision).need(32)
    assert abs(estimate / peak - 1) < 0.15, (estimate, peak)
