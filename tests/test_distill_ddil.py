"""DDIL (tandem.distill.ddil) and reflected diffusion (tandem.reflect), checked against independent
recomputations on the tiny random world: forward diffusion against diffusers' DDPMScheduler, the teacher's
rollouts against diffusers' DDIMScheduler with classifier-free guidance done here, the student's against the
exported student's own pipeline; Algorithm 2's per-transition choice and the DAgger buffer; an exact resume
with the buffer; DDIL that keeps only forward diffusion (or only the student's rollouts) against the method
without it; the thresholdings against diffusers' own; every integration from the command line."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from clitools import tandem_in_process
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
)
from distilltools import encode_text
from safetensors.torch import load_file

from tandem.denoiser import NoiseSchedule, trailing_timesteps
from tandem.distill.consistency import (
    ConsistencyConfig,
    ConsistencyDistillation,
    distill_consistency,
    make_student_unet,
)
from tandem.distill.consistency import export_student as export_consistency
from tandem.distill.ddil import DAggerBuffer, DDILSampler, DDILSpec, Denoiser, mixed_roll, roll
from tandem.distill.dmd2 import DMD2Config, DMD2Distillation, distill_dmd2
from tandem.distill.latent_range import measure_latent_range
from tandem.distill.progressive import ProgressiveConfig, ProgressiveDistillation, distill_progressive
from tandem.distill.progressive import export_student as export_progressive
from tandem.loaders import load_student
from tandem.models import world_dir
from tandem.reflect import RANGE_FILE, Reflection
from tandem.sampling import consistency_sample
from tandem.students import read_student_info
from tandem.training.config import TrainerConfig

W_DIM = 16
CAPTIONS = ["a red circle", "two blue squares at the top", "a small green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def schedule(teacher) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler(teacher.scheduler.config)


@pytest.fixture(scope="module")
def w_student(teacher):
    """A w-conditioned UNet with a random w-projection (guidance visibly matters)."""
    torch.manual_seed(1)
    unet = make_student_unet(teacher.unet, W_DIM)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    return unet.eval()


def _alphas(teacher) -> torch.Tensor:
    """diffusers' ᾱ in float64, with ᾱ = 1 appended at index -1 (the clean end)."""
    ac = DDPMScheduler.from_config(teacher.scheduler.config).alphas_cumprod.double()
    return torch.cat([ac, torch.ones(1, dtype=torch.float64)])


def _ddim(teacher, steps: int, **kwargs) -> DDIMScheduler:
    ddim = DDIMScheduler.from_config(teacher.scheduler.config, **{"timestep_spacing": "trailing",
                                                                  "set_alpha_to_one": True, "clip_sample": False,
                                                                  **kwargs})
    ddim.set_timesteps(steps)
    return ddim


def _step_latents(pipe, prompts: list[str], **kwargs) -> list[torch.Tensor]:
    """The latents after each step of a diffusers pipeline's call."""
    states = []

    def keep(pipeline, i, t, step_kwargs):
        states.append(step_kwargs["latents"].clone())
        return step_kwargs

    pipe(prompts, output_type="latent", callback_on_step_end=keep, **kwargs)
    return states


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the spec ---------------------------------------------------------------------------------------------


def test_spec_reads_the_documented_forms():
    spec = DDILSpec.parse("frwd=0.5,teacher=0.25,student=0.25")
    assert (spec.frwd, spec.teacher, spec.student, spec.mixed, spec.buffer) == (0.5, 0.25, 0.25, 1.0, 0)
    full = DDILSpec.parse(" frwd=0.75 , student=0.25, mixed=0.15, buffer=512, ramp=100, ")
    assert (full.teacher, full.mixed, full.buffer, full.ramp) == (0.0, 0.15, 512, 100)  # unnamed priors are 0
    for s in (spec, full, DDILSpec.parse("teacher=0.5,student=0.5,teacher_steps=8")):
        assert DDILSpec.parse(s.describe()) == s


@pytest.mark.parametrize("text, needle", [
    ("frwd=0.5,teacher=0.25", "must sum to 1, got 0.75"),
    ("frwd=0.7,student=0.7", "must sum to 1"),
    ("frwd=1.5,teacher=-0.5", "frwd"),
    ("frwd=1,frwd=0", "'frwd' is given twice"),
    ("frwd=1,beta=0.3", "'beta=0.3' is not KEY=VALUE"),
    ("frwd=1,student", "'student' is not KEY=VALUE"),
    ("frwd=half,student=0.5", "'frwd' must be a number"),
    ("frwd=0.5,student=0.5,buffer=1.5", "'buffer' must be an integer"),
    ("frwd=0.5,student=0.5,mixed=1.2", "mixed"),
    ("frwd=1,mixed=0.5", "mixed applies to the student's rollouts"),
    ("frwd=1,buffer=16", "buffer applies to the student's rollouts"),
    ("frwd=0.5,student=0.5,teacher_steps=8", "no rollout uses the teacher"),
    ("mixed=0.5", "give the priors"),
    ("frwd=0.5,teacher=0.5,student=0,phase2=10,phase2_student=0.8", "at most 1"),
    ("frwd=0.85,student=0.15,phase2=10", "replay draws from the DAgger buffer"),
    ("frwd=0.85,student=0.15,buffer=8,phase2=10,replay=1.5", "replay"),
])
def test_bad_specs_are_refused(text, needle):
    with pytest.raises(ValueError, match=needle):
        DDILSpec.parse(text)


def test_the_student_share_ramps_linearly():
    spec = DDILSpec.parse("frwd=0.5,teacher=0.1,student=0.4,ramp=10")
    for step, student in ((0, 0.0), (5, 0.2), (10, 0.4), (50, 0.4)):
        frwd, teacher, got = spec.priors(step)
        assert got == pytest.approx(student) and teacher == 0.1 and frwd + teacher + got == pytest.approx(1.0)


def test_the_source_follows_the_priors_and_one_source_draws_nothing(schedule):
    sampler = DDILSampler(DDILSpec.parse("frwd=0.5,teacher=0.2,student=0.3"), schedule)
    draws = [sampler.source(torch.Generator().manual_seed(seed), 0) for seed in range(3000)]
    for name, prior in (("frwd", 0.5), ("teacher", 0.2), ("student", 0.3)):
        assert draws.count(name) / 3000 == pytest.approx(prior, abs=0.03), name
    assert draws == [sampler.source(torch.Generator().manual_seed(seed), 0) for seed in range(3000)]
    ramped = DDILSampler(DDILSpec.parse("frwd=0.5,student=0.5,ramp=100"), schedule)
    assert {ramped.source(torch.Generator().manual_seed(s), 0) for s in range(200)} == {"frwd"}
    alone = DDILSampler(DDILSpec.parse("student=1"), schedule)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert alone.source(g, 0) == "student" and torch.equal(g.get_state(), state)


# -- the three sources against independent recomputations ------------------------------------------------------


def test_forward_source_is_diffusers_add_noise(schedule, teacher):
    sampler = DDILSampler(DDILSpec.parse("frwd=1"), schedule)
    grid = trailing_timesteps(4)
    latents, noise = _randn(4, 4, 8, 8, seed=0), _randn(4, 4, 8, 8, seed=1)
    index = torch.tensor([0, 3, 1, 2])
    out = sampler.inputs(latents=latents, noise=noise, grid=grid, index=index, cond={}, teacher=None, student=None,
                         generator=torch.Generator().manual_seed(0), step=0)
    t = torch.tensor(grid)[index]
    torch.testing.assert_close(out.x, DDPMScheduler.from_config(teacher.scheduler.config).add_noise(latents, noise, t),
                               rtol=1e-5, atol=1e-6)
    assert out.source == "frwd" and torch.equal(out.index, index) and out.log["ddil/teacher_unet_calls"] == 0


def test_teacher_backward_is_guided_diffusers_ddim(teacher, schedule):
    """Rolled on its trailing 8-step grid to on-grid targets, the guided teacher stands where diffusers'
    DDIMScheduler stands after as many steps of ε_u + w (ε_c - ε_u) computed here; an off-grid target is one more
    DDIM step (the closed form, float64) from the grid point above it."""
    ddim = _ddim(teacher, 8)
    grid = ddim.timesteps.tolist()
    sampler = DDILSampler(DDILSpec.parse("teacher=1,teacher_steps=8"), schedule)
    noise = _randn(4, 4, 8, 8, seed=2)
    cond, w = encode_text(teacher, CAPTIONS), torch.tensor([1.0, 2.0, 4.0, 6.0])
    method_grid = [999, 624, 600, 124]  # a grid of the method's own: 600 is not on the teacher's
    index = torch.tensor([1, 3, 2, 0])
    from tandem.distill.common import TeacherParts

    model = Denoiser(TeacherParts(teacher).guided_x0, [0], calls=2)  # its grid comes from teacher_steps
    out = sampler.inputs(latents=None, noise=noise, grid=method_grid, index=index, cond={"cond": cond, "w": w},
                         teacher=model, student=None, generator=torch.Generator(), step=0)

    uncond = encode_text(teacher, [""])
    expected = []
    for i in range(4):
        x, target = noise[i:i + 1], method_grid[int(index[i])]
        for t in grid:
            if t <= target:
                break
            with torch.no_grad():
                e_c, e_u = teacher.unet(x, t, cond[i:i + 1]).sample, teacher.unet(x, t, uncond).sample
            eps = e_u + w[i] * (e_c - e_u)
            if target == 600 and t == 624:  # the last step leaves diffusers' grid: DDIM in closed form
                ac = _alphas(teacher)
                x0 = (x.double() - (1 - ac[t]).sqrt() * eps.double()) / ac[t].sqrt()
                x = (ac[600].sqrt() * x0 + (1 - ac[600]).sqrt() * eps.double()).float()
                break
            x = ddim.step(eps, t, x).prev_sample
        expected.append(x)
    torch.testing.assert_close(out.x, torch.cat(expected), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.x[3], noise[3])  # a target at the start is the pure noise itself
    # UNet calls: 2 per step and sample (999 -> 874 -> 749 -> 624: 3 steps; -> 124: 7; -> 600: 4; none)
    assert out.log["ddil/teacher_unet_calls"] == 2 * (3 + 7 + 4 + 0) and out.log["ddil/teacher"] == 1


def test_student_backward_is_the_exported_progressive_students_pipeline(teacher, schedule, w_student, tiny_world,
                                                                      tmp_path):
    method = ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=8, guidance_steps=2, round_steps=2,
                                                                w_embedding_dim=W_DIM))
    stage = next(i for i, (name, _, n) in enumerate(method.cfg.stages) if n == 4 and name != "guidance")
    path = export_progressive(w_student, tmp_path / "student", method, stage,
                              SimpleNamespace(name="tiny", path=str(tiny_world)), guidance_scale=3.0,
                              optimisation_steps=1)
    pipe = load_student(path, teacher)
    z, scale = _randn(2, 4, 8, 8, seed=3), 4.0
    states = _step_latents(pipe, CAPTIONS[:2], num_inference_steps=4, guidance_scale=scale, latents=z.clone())
    grid = trailing_timesteps(4)
    sampler = DDILSampler(DDILSpec.parse("student=1"), schedule)
    student = Denoiser(partial(method.sampled_x0, w_student), grid)
    cond = {"cond": encode_text(teacher, CAPTIONS[:2]), "w": torch.full((2,), scale)}
    for k in (1, 2, 3):
        out = sampler.inputs(latents=None, noise=z, grid=grid, index=torch.full((2,), k), cond=cond, teacher=None,
                             student=student, generator=torch.Generator(), step=0)
        torch.testing.assert_close(out.x, states[k - 1], rtol=1e-4, atol=1e-4)
        assert out.log["ddil/student_unet_calls"] == 2 * k


def test_student_backward_is_the_exported_consistency_students_pipeline(teacher, schedule, w_student, tiny_world,
                                                                       tmp_path):
    """A consistency student rolls with its own (LCM) sampler: its fresh noise from the step's generator is
    what diffusers' LCM pipeline draws from the same generator."""
    method = ConsistencyDistillation(teacher, ConsistencyConfig(w_embedding_dim=W_DIM, num_ddim_timesteps=50))
    path = export_consistency(w_student, tmp_path / "student", method,
                              SimpleNamespace(name="tiny", path=str(tiny_world), teacher=SimpleNamespace(
                                  guidance_scale=3.0)), "student", 1)
    pipe = load_student(path, teacher)
    assert isinstance(pipe, LatentConsistencyModelPipeline)
    z, scale = _randn(1, 4, 8, 8, seed=4), 5.0
    states = _step_latents(pipe, CAPTIONS[:1], num_inference_steps=4, guidance_scale=scale, latents=z.clone(),
                           generator=torch.Generator().manual_seed(9))
    lcm_grid = pipe.scheduler.timesteps.tolist()
    sampler = DDILSampler(DDILSpec.parse("student=1"), schedule)
    student = Denoiser(partial(method.sampled_x0, w_student), lcm_grid, stochastic=True)
    cond = {"cond": encode_text(teacher, CAPTIONS[:1]), "w": torch.full((1,), scale)}
    grid = method.grid.tolist()
    for k in (1, 2, 3):
        out = sampler.inputs(latents=None, noise=z, grid=grid, index=torch.tensor([grid.index(lcm_grid[k])]),
                             cond=cond, teacher=None, student=student, generator=torch.Generator().manual_seed(9),
                             step=0)
        torch.testing.assert_close(out.x, states[k - 1], rtol=1e-4, atol=1e-4)


# -- Algorithm 2: mixed rollouts, and the DAgger buffer ----------------------------------------------------------


def _linear(scale: float):
    def x0(x, t):
        return scale * x
    return x0


def test_mixed_rollout_chooses_per_transition_with_probability_beta(teacher, schedule):
    """Each transition of the 4-step student grid is the student's (x₀ = x / 2, one step) with probability β,
    else the teacher's (x₀ = -x / 4, two steps of its 8-step grid): the choices have frequency β, and every
    sample's state is what its own choices give in closed form (float64)."""
    student = Denoiser(_linear(0.5), trailing_timesteps(4))
    expert = Denoiser(_linear(-0.25), trailing_timesteps(8), calls=2)
    b, beta = 400, 0.3
    x = _randn(b, 4, 2, 2, seed=5)
    targets = torch.tensor([249, 499, 749, 999] * (b // 4))
    out = mixed_roll(student, expert, beta, x, {}, targets, schedule, torch.Generator().manual_seed(1))
    chose = torch.stack(out.by_student)  # [transitions, B]
    moved = torch.stack([(targets < t) for t in student.timesteps[:len(out.by_student)]])
    assert chose[~moved].sum() == 0  # samples at their target take no transition
    assert float(chose[moved].float().mean()) == pytest.approx(beta, abs=0.04)
    assert out.calls == {"student": int(chose.sum()), "teacher": 2 * 2 * int((moved & ~chose).sum())}

    ac = _alphas(teacher)

    def ddim(x, x0, t, s):
        eps = (x - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
        return ac[s].sqrt() * x0 + (1 - ac[s]).sqrt() * eps

    expected = x.double().clone()
    for k, t in enumerate(student.timesteps[:len(out.by_student)]):
        s = student.timesteps[k + 1] if k + 1 < 4 else -1
        for j in moved[k].nonzero().flatten().tolist():
            if chose[k, j]:
                expected[j] = ddim(expected[j], 0.5 * expected[j], t, s)
            else:
                for a, c in ((t, t - 125), (t - 125, s)):
                    expected[j] = ddim(expected[j], -0.25 * expected[j], a, c)
    torch.testing.assert_close(out.x.double(), expected, rtol=1e-4, atol=1e-5)
    again = mixed_roll(student, expert, beta, x, {}, targets, schedule, torch.Generator().manual_seed(1))
    other = mixed_roll(student, expert, beta, x, {}, targets, schedule, torch.Generator().manual_seed(2))
    assert torch.equal(again.x, out.x) and not torch.equal(other.x, out.x)
    for beta, expected_share in ((1.0, 1.0), (0.0, 0.0)):  # no coin: the student's sampler, the teacher's
        g = torch.Generator().manual_seed(0)
        state = g.get_state()
        pure = mixed_roll(student, expert, beta, x, {}, targets, schedule, g)
        assert float(torch.stack(pure.by_student)[moved].float().mean()) == expected_share
        assert torch.equal(g.get_state(), state)
    torch.testing.assert_close(roll(expert, x, {}, targets, expert.timesteps, schedule, torch.Generator())[0],
                               pure.x, rtol=0, atol=0)


def test_dagger_buffer_is_bounded_first_in_first_out_seeded_and_restored():
    buffer = DAggerBuffer(5)
    x = torch.arange(7.0).reshape(7, 1).expand(7, 3).clone()
    buffer.add(x[:3], torch.tensor([0, 1, 2]), {"w": torch.arange(3.0)})
    buffer.add(x[3:], torch.tensor([3, 4, 5, 6]), {"w": torch.arange(3.0, 7.0)})
    assert len(buffer) == 5
    drawn, index, cond = buffer.draw(200, torch.Generator().manual_seed(0), "cpu")
    assert set(index.tolist()) == {2, 3, 4, 5, 6}  # the two oldest states left
    assert torch.equal(drawn[:, 0], index.float()) and torch.equal(cond["w"], index.float())  # rows stay together
    restored = DAggerBuffer(5)
    restored.load_state_dict(buffer.state_dict())
    for b in (buffer, restored):  # the same draws, and the same next eviction
        b.add(x[:1] + 100, torch.tensor([7]), {"w": torch.tensor([7.0])})
    a, b = (buf.draw(50, torch.Generator().manual_seed(3), "cpu") for buf in (buffer, restored))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and 2 not in a[1].tolist()
    with pytest.raises(ValueError, match="more than this run's"):
        DAggerBuffer(2).load_state_dict(buffer.state_dict())


def test_buffered_student_source_draws_the_states_of_its_rollouts(teacher, schedule):
    """Algorithm 3: the whole mixed rollout's states (each with its caption's conditioning) go to the buffer, and
    the batch is drawn from it: every drawn state is one the rollout visited, at its grid index."""
    sampler = DDILSampler(DDILSpec.parse("student=1,mixed=0.5,buffer=64"), schedule)
    student = Denoiser(_linear(0.5), trailing_timesteps(4))
    expert = Denoiser(_linear(-0.25), trailing_timesteps(8), calls=2)
    grid = trailing_timesteps(4)

    def x0(x, t, w):  # conditioning rows reach the models
        return 0.5 * x * w.reshape(-1, 1, 1, 1)

    student.x0, expert.x0 = x0, x0
    noise, w = _randn(3, 4, 2, 2, seed=6), torch.tensor([0.1, 0.2, 0.3])
    out = sampler.inputs(latents=None, noise=noise, grid=grid, index=torch.zeros(3, dtype=torch.long),
                         cond={"w": w}, teacher=expert, student=student, generator=torch.Generator().manual_seed(0),
                         step=0)
    assert len(sampler.buffer) == 3 * 3 and out.log["ddil/buffer"] == 9  # 3 samples x 3 grid points past the noise
    stored = sampler.buffer.state_dict()
    for j in range(3):
        k = int(out.index[j])
        match = [i for i in range(9) if torch.equal(stored["x"][i], out.x[j])]
        assert match and all(int(stored["index"][i]) == k for i in match) and 1 <= k <= 3
        assert any(torch.equal(stored["cond"]["w"][i], out.cond["w"][j]) for i in match)


# -- runs: resume with the buffer, DDIL that changes nothing ------------------------------------------------------

_PD = ProgressiveConfig(start_steps=4, guidance_steps=1, round_steps=3, w_embedding_dim=W_DIM, lr=1e-3)
_PD_DDIL = DDILSpec.parse("frwd=0.25,teacher=0.25,student=0.5,mixed=0.5,buffer=8")


def _pd_run(tiny_world, out, max_steps, ddil=_PD_DDIL, resume=False, reflect=None):
    return distill_progressive(str(tiny_world), out, _PD, TrainerConfig(max_steps=max_steps, batch_size=2,
                                                                        checkpoint_every=1, log_every=1, seed=4),
                               data="world", resume=resume, ddil=ddil, reflect=reflect)


def _weights(student_dir):
    return load_file(student_dir / "unet" / "diffusion_pytorch_model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progressive_resume_with_a_dagger_buffer_is_bitwise(tiny_world, one_thread, tmp_path):
    """Stopped inside the round to 2 steps with states in the buffer (seed 4: the student's source at steps 1 and
    2), and resumed: the buffer comes back from the checkpoint (the round to 1 step then starts it again)."""
    whole = _pd_run(tiny_world, tmp_path / "whole", 5)
    _pd_run(tiny_world, tmp_path / "part", 2)
    saved = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", weights_only=True)["method"]["ddil"]["buffer"]
    assert saved["size"] > 0
    part = _pd_run(tiny_world, tmp_path / "part", 5, resume=True)
    assert _same(_weights(whole), _weights(part))
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert "ddil/frwd" not in log[0] and all("ddil/buffer" in r for r in log[1:])  # the guidance stage: no DDIL
    assert [r["ddil/student"] for r in log[1:3]] == [1, 1] and log[4]["ddil/buffer"] == 0  # round 1-step: emptied
    info = read_student_info(whole)
    assert info.method == "progressive+ddil" and info.details["ddil"]["buffer"] == 8
    assert read_student_info(tmp_path / "whole" / "rounds" / "4-steps").method == "progressive"  # guidance stage


def test_consistency_resume_with_a_dagger_buffer_is_bitwise(tiny_world, one_thread, tmp_path):
    cfg = ConsistencyConfig(w_embedding_dim=W_DIM, lr=1e-3, num_ddim_timesteps=10)
    ddil = DDILSpec.parse("frwd=0.5,student=0.5,buffer=6")

    def run(out, steps, resume=False):
        return distill_consistency(str(tiny_world), out, cfg, TrainerConfig(max_steps=steps, batch_size=2, seed=3,
                                                                            checkpoint_every=1), data="world",
                                   resume=resume, ddil=ddil)

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 2)
    part = run(tmp_path / "part", 4, resume=True)
    assert _same(_weights(whole), _weights(part))
    state = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", weights_only=True)
    assert state["method"]["ddil"]["buffer"]["size"] > 0
    assert read_student_info(whole).method == "consistency+ddil"


def test_forward_only_ddil_is_the_method_without_it(tiny_world, one_thread, tmp_path):
    """``frwd=1`` draws nothing and noises the data as the method does: the same student bit for bit. (The
    methods without --ddil are checked against their earlier results by their own tests.)"""
    plain = _pd_run(tiny_world, tmp_path / "plain", 3, ddil=None)
    forward = _pd_run(tiny_world, tmp_path / "forward", 3, ddil=DDILSpec.parse("frwd=1"))
    assert _same(_weights(plain), _weights(forward))
    assert "ddil" not in json.loads((tmp_path / "plain" / "train_config.json").read_text())
    assert json.loads((tmp_path / "forward" / "train_config.json").read_text())["ddil"]["frwd"] == 1.0


def test_dmd2s_student_only_ddil_is_its_backward_simulation(tiny_world, one_thread, tmp_path):
    def run(out, ddil, **kwargs):
        cfg = DMD2Config(real_guidance=3.0, steps=2, critic_updates=2, lr=1e-3, **kwargs)
        return distill_dmd2(str(tiny_world), out, cfg, TrainerConfig(max_steps=3, batch_size=2, log_every=1, seed=2),
                            data="world", ddil=ddil)

    simulated = run(tmp_path / "sim", None)
    ddil = run(tmp_path / "ddil", DDILSpec.parse("student=1"))
    assert _same(_weights(simulated), _weights(ddil))
    forward = run(tmp_path / "forward", DDILSpec.parse("frwd=1"))
    assert _same(_weights(run(tmp_path / "noised", None, backward_simulation=False)), _weights(forward))
    info = read_student_info(ddil)
    assert info.method == "dmd2+ddil" and not info.details["backward_simulation"]
    with pytest.raises(ValueError, match="no buffer="):
        run(tmp_path / "buffer", DDILSpec.parse("frwd=0.5,student=0.5,buffer=4"))
    assert not (tmp_path / "buffer").exists()


# -- reflection --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("off", None), ("static:-2,3", Reflection("static", -2.0, 3.0)), ("dynamic", Reflection("dynamic")),
    ("dynamic:0.9", Reflection("dynamic", percentile=0.9)), ("dynamic:0.9,4", Reflection("dynamic", percentile=0.9,
                                                                                        bound=4.0)),
])
def test_reflect_option_forms(text, expected):
    assert Reflection.parse(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("clip", "expected static"), ("static:1", "two numbers"), ("static:3,-2", "lo < hi"), ("static:a,b", "numbers"),
    ("dynamic:1.5", "percentile"), ("dynamic:0.9,0", "bound"), ("dynamic:0.9,1,2", "P or P,BOUND"),
])
def test_bad_reflect_options_are_refused(text, needle):
    with pytest.raises(ValueError, match=needle):
        Reflection.parse(text)


def test_dynamic_reflection_is_diffusers_thresholding_scaled_to_the_latents_bound():
    x = 3 * _randn(3, 4, 8, 8, seed=7)
    x[0] *= 0.1  # a sample inside [-1, 1]: left alone
    diffusers = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e9)
    assert torch.equal(Reflection("dynamic", percentile=0.9, bound=1.0)(x), diffusers._threshold_sample(x))
    ours = Reflection("dynamic", percentile=0.9, bound=2.5)(x)
    torch.testing.assert_close(ours, 2.5 * diffusers._threshold_sample(x / 2.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[0], x[0], rtol=1e-6, atol=1e-6)
    assert ours.abs().max() <= 2.5 + 1e-6 and (ours - x).abs().max() > 0.1
    assert torch.equal(Reflection("static", -1.0, 2.0)(x), x.clamp(-1, 2))


def test_per_channel_reflection_clips_each_channel_to_its_own_range():
    x = 3 * _randn(3, 4, 8, 8, seed=8)
    lo, hi = (-1.0, -2.0, -0.5, -3.0), (0.5, 2.0, 1.5, 0.25)
    got = Reflection("static", lo, hi)(x)
    for c in range(4):  # channel by channel, by hand
        assert torch.equal(got[:, c], x[:, c].clamp(lo[c], hi[c]))
    assert Reflection.from_json(Reflection("static", lo, hi).to_json()) == Reflection("static", lo, hi)
    assert Reflection.from_json({"mode": "static", "lo": list(lo), "hi": list(hi)}) == Reflection("static", lo, hi)
    with pytest.raises(ValueError, match="4 channels"):
        Reflection("static", lo, hi)(x[:, :3])
    with pytest.raises(ValueError, match="alike"):
        Reflection("static", lo, hi[:3])
    with pytest.raises(ValueError, match="lo < hi"):
        Reflection("static", (0.0, 1.0), (1.0, 0.5))
    assert Reflection.parse("static:global") == Reflection("static", scope="global")


def test_the_world_ships_its_measured_latent_range(tiny_world, teacher):
    measured = json.loads((world_dir() / RANGE_FILE).read_text())
    assert measured["images"] == 4096 and "python -m tandem.reflect world" in measured["command"]
    per_channel = Reflection("static", tuple(measured["per_channel"]["lo"]), tuple(measured["per_channel"]["hi"]))
    assert Reflection.parse("static").resolved(world_dir()) == per_channel
    assert Reflection.parse("static:global").resolved(world_dir()) == Reflection("static", measured["lo"],
                                                                                 measured["hi"])
    assert Reflection.parse("dynamic").resolved(world_dir()) == Reflection("dynamic", percentile=0.995,
                                                                           bound=measured["bound"])
    with pytest.raises(ValueError, match="latent_range.json"):
        Reflection.parse("static").resolved(tiny_world)
    small = measure_latent_range(str(tiny_world), images=48, seed=1, batch_size=16)
    from tandem.distill.common import TeacherParts
    from tandem.distill.data import WorldSource

    parts = TeacherParts(teacher)
    g = torch.Generator().manual_seed(1)
    latents = torch.cat([parts.encode_images(WorldSource(1).batch(i, 16)["pixels"], g) for i in range(3)])
    assert (small["lo"], small["hi"]) == (float(latents.min()), float(latents.max()))
    assert small["bound"] == max(-small["lo"], small["hi"]) and small["images"] == 48


@pytest.mark.parametrize("reflection, reference", [
    (Reflection("static", -0.5, 0.5), {"clip_sample": True, "clip_sample_range": 0.5}),
    (Reflection("dynamic", percentile=0.9, bound=1.0), {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                                        "sample_max_value": 1e9}),
])
def test_a_reflected_student_samples_with_diffusers_thresholding(reflection, reference, teacher, w_student, tiny_world,
                                                                 tmp_path):
    method = ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=8, guidance_steps=2, round_steps=2,
                                                                w_embedding_dim=W_DIM), reflect=reflection)
    stage = next(i for i, (name, _, n) in enumerate(method.cfg.stages) if n == 4 and name != "guidance")
    spec = SimpleNamespace(name="tiny", path=str(tiny_world))
    path = export_progressive(w_student, tmp_path / "student", method, stage, spec, 3.0, 1)
    info = read_student_info(path)
    assert info.method == "progressive+reflected" and info.details["reflect"] == reflection.to_json()
    saved = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert not saved["thresholding"]  # the file stays diffusers' plain DDIM; tandem's loader adds the reflection
    pipe = load_student(path, teacher)
    z, prompts = _randn(2, 4, 8, 8, seed=8), CAPTIONS[:2]
    got = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=z.clone(), output_type="latent").images
    ddim = _ddim(teacher, 4, **reference)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((2,), 2.0), W_DIM)
    cond, x = encode_text(teacher, prompts), z
    for t in ddim.timesteps:
        with torch.no_grad():
            eps = w_student(x, t, cond, timestep_cond=w_emb).sample
        # the step goes on with the noise the thresholded x₀ implies (Glide's use_clipped_model_output; DPM-Solver++)
        x = ddim.step(eps, t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    plain = load_student(path, teacher)
    plain.scheduler = DDIMScheduler.from_config(_ddim(teacher, 4).config)
    unreflected = plain(prompts, num_inference_steps=4, guidance_scale=3.0, latents=z.clone(),
                        output_type="latent").images
    assert (unreflected - got).abs().max() > 1e-3  # the thresholding bites on this random student


def test_a_reflected_consistency_student_samples_as_lcm_with_clipping(teacher, w_student, tiny_world, tmp_path):
    reflection = Reflection("static", -0.5, 0.5)
    method = ConsistencyDistillation(teacher, ConsistencyConfig(w_embedding_dim=W_DIM), reflect=reflection)
    spec = SimpleNamespace(name="tiny", path=str(tiny_world), teacher=SimpleNamespace(guidance_scale=3.0))
    path = export_consistency(w_student, tmp_path / "student", method, spec, "student", 1)
    assert read_student_info(path).method == "consistency+reflected"
    pipe = load_student(path, teacher)
    z, prompts = _randn(1, 4, 8, 8, seed=9), CAPTIONS[:1]
    got = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=z.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(1)).images
    reference = load_student(path, teacher)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config, thresholding=False, clip_sample=True,
                                                   clip_sample_range=0.5)
    expected = reference(prompts, num_inference_steps=4, guidance_scale=3.0, latents=z.clone(), output_type="latent",
                         generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ours = consistency_sample(pipe.unet, pipe.scheduler.alphas_cumprod, z.clone(), encode_text(teacher, prompts),
                              [torch.Generator().manual_seed(1)], steps=4, guidance_scale=3.0, reflect=reflection)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    plain = consistency_sample(pipe.unet, pipe.scheduler.alphas_cumprod, z.clone(), encode_text(teacher, prompts),
                               [torch.Generator().manual_seed(1)], steps=4, guidance_scale=3.0)
    assert (plain - ours).abs().max() > 1e-3


def test_reflection_reaches_the_teachers_estimates(teacher, w_student):
    """Progressive: the round teacher's two DDIM steps are diffusers' DDIM with ``clip_sample`` (and the noise the
    clipped x₀ implies). DMD2: the real and fake x₀ and the student's output are clipped."""
    reflection = Reflection("static", -0.5, 0.5)
    method = ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=8, guidance_steps=2, round_steps=2,
                                                                w_embedding_dim=W_DIM), reflect=reflection)
    ddim = _ddim(teacher, 4, clip_sample=True, clip_sample_range=0.5)
    fine = ddim.timesteps.tolist()
    x, w = _randn(1, 4, 8, 8, seed=10), torch.tensor([3.0])
    cond = encode_text(teacher, CAPTIONS[:1])
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, W_DIM)
    got = method.two_teacher_steps(w_student, x, torch.tensor([fine[0]]), torch.tensor([fine[1]]),
                                   torch.tensor([fine[2]]), cond, w_emb)
    expected = x
    for t in fine[:2]:
        with torch.no_grad():
            eps = w_student(expected, t, cond, timestep_cond=w_emb).sample
        expected = ddim.step(eps, t, expected, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    dmd = DMD2Distillation(teacher, DMD2Config(real_guidance=3.0), reflect=reflection)
    x_t, s, eps = _randn(2, 4, 8, 8, seed=11), torch.tensor([300, 700]), _randn(2, 4, 8, 8, seed=12)
    cond2 = encode_text(teacher, CAPTIONS[:2])
    out = dmd.dmd_gradient(x_t, s, eps, cond2, teacher.unet)
    assert out["x0_real"].abs().max() <= 0.5 and out["x0_fake"].abs().max() <= 0.5
    with torch.no_grad():
        raw = dmd.schedule.to_x0(teacher.unet(dmd.schedule.add_noise(x_t, eps, s), s, cond2).sample,
                                 dmd.schedule.add_noise(x_t, eps, s), s)
    torch.testing.assert_close(out["x0_fake"], raw.clamp(-0.5, 0.5), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert dmd.x0_of(dmd.student, x_t, s, cond2).abs().max() <= 0.5


# -- the command line ---------------------------------------------------------------------------------------------


def _cli(capsys, monkeypatch, *args):
    result = tandem_in_process(capsys, monkeypatch, *[str(a) for a in args])
    return result.returncode, result.stderr


@pytest.mark.parametrize("method, extra, steps", [
    ("progressive", ["--start-steps", 4, "--guidance-steps", 1, "--round-steps", 1,
                     "--ddil", "frwd=0.4,teacher=0.3,student=0.3,mixed=0.5,buffer=8"], 2),
    ("consistency", ["--ddim-steps", 10, "--ddil", "frwd=0.5,student=0.5,ramp=1"], 4),
    ("dmd2", ["--steps", 2, "--critic-updates", 1, "--regression-steps", 4,
              "--ddil", "frwd=0.2,teacher=0.4,student=0.4,mixed=0.5"], 2),
])
def test_cli_trains_a_reflected_ddil_student_that_generates(method, extra, steps, tiny_world, teacher, tmp_path,
                                                            capsys, monkeypatch):
    out = tmp_path / method
    code, err = _cli(capsys, monkeypatch, "distill", method, "--teacher", tiny_world, "--out", out, "--max-steps", 2,
                     "--batch-size", 2, "--threads", 1, "--reflect", "dynamic:0.99,3", *extra)
    assert code == 0, err
    info = read_student_info(out / "student")
    assert info.method == f"{method}+ddil+reflected"
    assert info.details["reflect"] == {"mode": "dynamic", "percentile": 0.99, "bound": 3.0}
    config = json.loads((out / "train_config.json").read_text())
    assert config["reflect"] == info.details["reflect"] and config["ddil"] == info.details["ddil"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(k.endswith("ddil/teacher_unet_calls") for k in log[-1])
    pipe = load_student(out / "student", teacher)
    assert pipe.scheduler.config.thresholding and pipe.scheduler._threshold_sample == Reflection.from_json(
        info.details["reflect"])
    from tandem.generate import StudentSettings, generate_student

    images = generate_student(pipe, CAPTIONS[:2], StudentSettings(steps=steps, guidance_scale=info.guidance_scale),
                              seed=0)
    assert len(images) == 2 and images[0].shape == (32, 32, 3)


@pytest.mark.parametrize("args, needle", [
    (["--ddil", "frwd=0.5,teacher=0.2"], "must sum to 1"),
    (["--reflect", "static"], "latent_range.json"),
    (["--reflect", "clip"], "expected static"),
])
def test_cli_bad_ddil_or_reflect_is_one_line(args, needle, tiny_world, tmp_path, capsys, monkeypatch):
    code, err = _cli(capsys, monkeypatch, "distill", "consistency", "--teacher", tiny_world, "--out", tmp_path / "run",
                     "--max-steps", 1, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


# -- the two phases -----------------------------------------------------------------------------------------------


def test_the_two_phase_schedule_counted_over_a_run(schedule):
    """Phase 1 (steps 0-99) at the first priors, phase 2 (100-299) at 0.8 student with half of every batch replayed
    from the buffer: the sources and the replayed share, counted over 300 steps of batch 8 with stub denoisers, are
    the schedule's; every replayed state is one the buffer held."""
    spec = DDILSpec.parse("frwd=0.85,student=0.15,buffer=64,phase2=100,phase2_student=0.8,replay=0.5")
    assert DDILSpec.parse(spec.describe()) == spec
    assert spec.priors(99) == (0.85, 0.0, 0.15) and spec.priors(100) == pytest.approx((0.2, 0.0, 0.8))
    sampler = DDILSampler(spec, schedule)
    student = Denoiser(_linear(0.5), trailing_timesteps(4))
    teacher = Denoiser(_linear(-0.25), trailing_timesteps(8))
    grid = trailing_timesteps(4)
    counts = {1: {"student": 0, "frwd": 0}, 2: {"student": 0, "frwd": 0}}
    replayed_rows = fresh_rows = 0
    for step in range(300):
        g = torch.Generator().manual_seed(step)
        held = sampler.buffer.state_dict() if len(sampler.buffer) else None
        out = sampler.inputs(latents=_randn(8, 4, 2, 2, seed=1000 + step), noise=_randn(8, 4, 2, 2, seed=step),
                             grid=grid, index=torch.randint(0, 4, (8,), generator=g), cond={}, teacher=teacher,
                             student=student, generator=g, step=step)
        phase = 1 if step < 100 else 2
        counts[phase][out.source] += 1
        k = round(float(out.log["ddil/replayed"]) * 8)
        if phase == 1 or held is None:
            assert k == 0
        else:
            assert k == 4
            for j in range(k):  # a replayed row is a state the buffer held before this step
                assert any(torch.equal(out.x[j], held["x"][i]) and int(held["index"][i]) == int(out.index[j])
                           for i in range(held["size"]))
        if phase == 2:
            replayed_rows, fresh_rows = replayed_rows + k, fresh_rows + 8 - k
    assert counts[1]["student"] / 100 == pytest.approx(0.15, abs=0.08)
    assert counts[2]["student"] / 200 == pytest.approx(0.8, abs=0.08)
    assert replayed_rows / (replayed_rows + fresh_rows) == pytest.approx(0.5, abs=0.01)
