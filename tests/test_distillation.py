"""Distillation (docs/distillation.md): the identity a student is trained to, on data whose ε is known exactly, and a
distilled run as a user meets it. All on the CPU in float64 (the identity) or fp32 (the runs)."""

from __future__ import annotations

import pytest
import torch

import diffuse_cli as diffuse
from diffuse_cli.api import DISTILL_LR, DISTILL_WARMUP
from diffuse_cli.diffusion.denoiser import Denoiser, SampleHooks
from diffuse_cli.diffusion.distillation import distill_loss, grids, student_target
from diffuse_cli.diffusion.pixels import to_model, to_uint8
from diffuse_cli.diffusion.objectives import target
from diffuse_cli.diffusion.samplers import ddim, spaced_timesteps
from diffuse_cli.diffusion.slider import explore_frames
from diffuse_cli.diffusion.schedule import NoiseSchedule
from diffuse_cli.errors import ConfigError, RunError, UsageError
from diffuse_cli.images.data import load_builtin

from .conftest import assert_clean_error
from .toy import mixture_2d

SCHEDULE = NoiseSchedule.make("cosine", 1000)
TINY = dict(preset="tiny", batch_size=8, device="cpu", precision="fp32")


def eps_of(x0: torch.Tensor, z: torch.Tensor, ab: torch.Tensor):
    """The ε-model that makes x0 the prediction at z (x0 = (z - σ ε)/α)."""
    return lambda x, t: (z - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("j", [0, 1, 3])  # the first step, a middle one, the last (into the clean image)
def test_one_student_step_to_the_target_lands_where_the_teachers_steps_land(j):
    """Salimans & Ho's eq. 8 for 4 teacher steps in one: DDIM from z_t with x̃ lands on the teacher's z_s exactly."""
    teacher = mixture_2d().eps_model(SCHEDULE)
    student, fine = grids(SCHEDULE, 4, 16)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
    z = SCHEDULE.q_sample(mixture_2d().sample(64, torch.Generator().manual_seed(9)), student[j].expand(64), z)
    end = student[j + 1] if j + 1 < 4 else None
    z_to = ddim(teacher, z, SCHEDULE, fine[4 * j:4 * j + 4], end=end)
    ab = SCHEDULE.alpha_bar_at(student[j:j + 1]).double()
    ab_to = SCHEDULE.alpha_bar_at(end[None]).double() if end is not None else torch.ones(1, dtype=torch.float64)
    x_tilde = student_target(z, z_to, ab, ab_to)
    one_step = ddim(eps_of(x_tilde, z, ab), z, SCHEDULE, student[j:j + 1], end=end)
    assert torch.allclose(one_step, z_to, atol=1e-10, rtol=0)
    own = ddim(teacher, z, SCHEDULE, student[j:j + 1], end=end)  # the teacher's one step lands elsewhere
    assert (own - z_to).abs().max() > 1e-3


def test_the_loss_of_a_student_that_takes_the_teachers_steps_is_zero():
    """distill_loss draws each image's student step from t, runs the teacher from there and converts x̃ to the
    objective: a student that runs the same teacher steps itself and answers in v scores 0, and one that answers
    with the teacher's own one-step v does not."""
    teacher = mixture_2d().eps_model(SCHEDULE)
    student_steps, fine = grids(SCHEDULE, 2, 8)
    x0 = mixture_2d().sample(32, torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(2))
    eps = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def perfect(z: torch.Tensor, t_from: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for row in range(len(z)):
            j = int((student_steps == t_from[row]).nonzero())
            end = student_steps[j + 1] if j + 1 < 2 else None
            z_to = ddim(teacher, z[row:row + 1], SCHEDULE, fine[4 * j:4 * j + 4], end=end)
            ab = SCHEDULE.alpha_bar_at(t_from[row:row + 1]).double()
            ab_to = SCHEDULE.alpha_bar_at(end[None]).double() if end is not None else torch.ones(1, dtype=torch.float64)
            x_tilde = student_target(z[row:row + 1], z_to, ab, ab_to)
            eps_tilde = (z[row:row + 1] - ab.sqrt() * x_tilde) / (1 - ab).sqrt()
            out[row] = target("v", SCHEDULE, x_tilde, t_from[row:row + 1], eps_tilde)[0]
        return out

    def one_step(z: torch.Tensor, t_from: torch.Tensor) -> torch.Tensor:
        e = teacher(z, t_from)
        x_hat = SCHEDULE.predict_x0(z, t_from, e)
        return target("v", SCHEDULE, x_hat, t_from, e)

    loss = lambda student: distill_loss(student, lambda rows: teacher, "v", SCHEDULE, x0, t, eps,
                                                (student_steps, fine))  # noqa: E731
    assert loss(perfect) < 1e-12 and loss(one_step) > 1e-4  # float64: rounding, against a real error


def test_the_student_and_teacher_steps_must_fall_on_each_other():
    assert [len(g) for g in grids(SCHEDULE, 3, 18)] == [3, 18]
    for steps, teacher_steps in ((3, 16), (4, 4)):
        with pytest.raises(ConfigError, match="multiple"):
            grids(SCHEDULE, steps, teacher_steps)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    diffuse.train(None, out=run, steps=20, image_size=8, **TINY)
    return run


def test_a_distilled_run_samples_in_its_steps_and_refuses_other_samplers(teacher_run, tmp_path):
    """The student's checkpoint says it is distilled and for how many steps; sample takes them by default, one
    network call a step, and refuses a sampler, step count or guidance that does not fit it."""
    student = diffuse.distill(teacher_run, tmp_path / "student", steps=2, train_steps=6, **TINY)
    loaded = diffuse.load(tmp_path / "student", "cpu")
    assert loaded.config == student.config and loaded.config.distill.steps == 2
    assert loaded.config.distill.teacher == str((teacher_run / "model.safetensors").resolve())
    assert loaded.config.model == diffuse.load(teacher_run, "cpu").config.model
    assert (loaded.config.train.lr, loaded.config.train.warmup) == (DISTILL_LR, DISTILL_WARMUP)  # tuned, not trained
    given = diffuse.distill(teacher_run, tmp_path / "given", steps=2, train_steps=1, lr=3e-4, warmup=2, **TINY)
    assert (given.config.train.lr, given.config.train.warmup) == (3e-4, 2)
    calls = []
    images = loaded.sample(3, batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert images.shape == (3, 3, 8, 8) and calls[-1] == (2, 2)
    assert torch.equal(images, loaded.sample(3, batch_size=3, sampler="ddim", steps=2))  # the same, asked for
    for asked in ({"sampler": "heun"}, {"steps": 25, "sampler": "ddim"}):
        with pytest.raises(UsageError, match="distilled to sample in 2 ddim steps"):
            loaded.sample(2, **asked)
    with pytest.raises(UsageError, match="guidance 1 distilled into it"):
        loaded.sample(2, guidance=3.0)
    totals = []  # interpolation walks the student's own 2 steps
    frames = diffuse.interpolate(loaded, seeds=(1, 2), frames=3, progress=lambda done, total: totals.append(total))
    assert frames.shape == (3, 3, 8, 8) and set(totals) == {2 * -(-3 // loaded.sampling_batch(3))}
    with pytest.raises(UsageError, match="distilled to 2 ddim steps; interpolate it without steps"):
        diffuse.interpolate(loaded, seeds=(1, 2), steps=50)


def test_the_time_slider_walks_a_student_on_its_own_steps(teacher_run, tmp_path):
    """A 2-step student explored (CPU, fp32): its walk back is its own 2 DDIM steps from the static, each frame
    showing where the walk stood at or above the frame's k, and a restoration from k is one step to the student's
    next grid point below and its steps from there: one network call a step, none hidden."""
    student = diffuse.distill(teacher_run, tmp_path / "student", steps=2, train_steps=6, **TINY)
    image, T = load_builtin(8, n=1).images[0], student.config.diffusion.timesteps
    steps = []
    frames = explore_frames(student.net, student.config, image, frames=11, seed=4,
                            hooks=SampleHooks(callback=lambda i, x_t, x0_hat: steps.append(i)))
    schedule = NoiseSchedule.make(student.config.diffusion.schedule, T)
    grid = spaced_timesteps(schedule, 2, "trailing")
    assert grid.tolist() == [999, 499]
    restoring = [1 + int((grid < k - 1).sum()) for k in frames.ks[1:]]  # from k = 100 .. 500: 1, from 600 up: 2
    # the hooks hear the restorations' steps (the walk's, the slider hears itself)
    assert restoring == [1] * 5 + [2] * 5 and steps == [i for n in restoring for i in range(n)]
    eps = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    static = schedule.q_sample(to_model(image)[None], torch.tensor([T - 1]), eps)
    own = Denoiser(student.net, student.config).walk(static, grid)
    assert torch.equal(frames.walk[0], to_uint8(own)[0])  # the image it ends on: the student's own walk
    for i, k in enumerate(frames.ks[1:], start=1):  # where it stood: the static down to k = 501, x_500 below
        assert torch.equal(frames.walk[i], frames.walk[-1] if k > 500 else frames.walk[1]), k
    assert not torch.equal(frames.walk[1], frames.walk[-1])
    with pytest.raises(UsageError, match="guidance 1 distilled into it"):
        diffuse.explore(student, image, frames=3, guidance=3.0)


def test_a_stopped_distillation_resumes_to_the_same_weights(teacher_run, tmp_path):
    whole = diffuse.distill(teacher_run, tmp_path / "whole", steps=2, train_steps=8, save_every=4, **TINY)
    stopped = diffuse.distill(teacher_run, tmp_path / "part", steps=2, train_steps=8, save_every=4,
                              hooks=diffuse.Hooks(should_stop=lambda step: step == 4), **TINY)
    assert stopped.training.step == 4
    resumed = diffuse.distill(teacher_run, tmp_path / "part", resume=True, **TINY)
    assert resumed.training.step == 8
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)


def test_what_cannot_be_distilled_is_refused_in_one_line(teacher_run, tmp_path, run_cli, monkeypatch):
    from diffuse_cli.training.runs import claim

    monkeypatch.chdir(tmp_path)
    assert_clean_error(run_cli("distill", tmp_path / "nothere"), "nothere")
    assert_clean_error(run_cli("distill", teacher_run, "--steps", "3", "--teacher-steps", "16"), "multiple")
    assert_clean_error(run_cli("distill", teacher_run, "--steps", "1000"), "--steps takes at most 500")
    assert_clean_error(run_cli("distill", teacher_run, "--teacher-steps", "2000"), "--teacher-steps 2000 is more "
                       "than the model's 1000 diffusion steps")
    with claim(teacher_run), pytest.raises(RunError, match="still training"):
        diffuse.distill(teacher_run, tmp_path / "s", **TINY)
    diffuse.distill(teacher_run, tmp_path / "s", steps=4, train_steps=1, **TINY)
    assert_clean_error(run_cli("distill", tmp_path / "s", "--steps", "4"), "distilled to 4 steps; a student of it "
                       "takes fewer, not 4")
    assert_clean_error(run_cli("distill", tmp_path / "s", "--steps", "3"), "takes a number of steps that divides "
                       "them (2, 1), not 3")
    assert_clean_error(run_cli("distill", tmp_path / "s", "--steps", "2", "--teacher-steps", "8"),
                       "leave out --teacher-steps and --guidance")
    assert_clean_error(run_cli("distill", teacher_run, "--out", tmp_path / "s"), "already holds a model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # nothing else written


def test_the_default_teacher_steps_stay_within_the_schedule(teacher_run, tmp_path):
    """16 teacher steps in each of a 100-step student's would be 1,600 on a 1,000-step schedule: it takes all 1,000."""
    student = diffuse.distill(teacher_run, tmp_path / "s", steps=100, train_steps=1, **TINY)
    assert (student.config.distill.steps, student.config.distill.teacher_steps) == (100, 1000)


def test_a_student_distilled_again_learns_from_the_students_own_steps(teacher_run, tmp_path, monkeypatch):
    """A round of progressive distillation: a 4-step student is the teacher of a 2-step one, which learns where two
    of the 4-step student's own DDIM steps (unclipped, unguided: its guidance is in its weights) land."""
    from diffuse_cli.diffusion import denoiser as denoiser_module

    first = diffuse.distill(teacher_run, tmp_path / "four", steps=4, train_steps=2, **TINY)
    assert first.config.distill.teacher_steps == 64  # 16 teacher steps in each of its own (docs/distillation.md)
    asked = []
    real = denoiser_module.Denoiser.eps_model

    def eps_model(self, count, labels=None, guidance=1.0, clip_x0=True, threshold="clip"):
        asked.append((self.config.distill, guidance))
        return real(self, count, labels, guidance, clip_x0, threshold)

    monkeypatch.setattr(denoiser_module.Denoiser, "eps_model", eps_model)
    second = diffuse.distill(tmp_path / "four", tmp_path / "two", steps=2, train_steps=2, **TINY)
    d = second.config.distill
    assert (d.steps, d.teacher_steps, d.guidance) == (2, 4, first.config.distill.guidance)
    assert d.teacher == str((tmp_path / "four" / "model.safetensors").resolve())
    assert asked and all(teacher == first.config.distill and g == 1.0 for teacher, g in asked[:2])
    calls = []
    diffuse.load(tmp_path / "two", "cpu").sample(2, progress=lambda done, total: calls.append(total))
    assert calls[-1] == 2


def test_a_timed_distillation_ends_on_its_budget_with_its_checkpoint_and_grid(teacher_run, tmp_path):
    """--max-time as in train: stopped by the time, with the last checkpoint and grid inside it (its closing is
    timed by one network call of the student, which no sampler check may refuse)."""
    student = diffuse.distill(teacher_run, tmp_path / "timed", steps=2, max_time=6.0, **TINY)
    assert student.training.stopped_by == "time" and diffuse.load(tmp_path / "timed", "cpu").config.distill.steps == 2
    assert (tmp_path / "timed" / "samples" / f"step_{student.training.step:06d}.png").exists()
