"""The denoiser contract (tandem.denoiser) checked against diffusers' schedulers and against closed
forms computed here in float64 NumPy from the same ᾱ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from tandem.denoiser import PREDICTION_TYPES, NoiseSchedule, trailing_timesteps

# The world's training schedule: SD's scaled-linear betas over 1000 steps.
SCHEDULE_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}
TIMESTEPS = [0, 1, 2, 10, 100, 499, 500, 900, 998, 999]


def _alphas_cumprod() -> np.ndarray:
    """ᾱ of the scaled-linear schedule, computed here in float64 (independently of diffusers)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _coefficients(t) -> tuple[np.ndarray, np.ndarray]:
    """(α_t, σ_t) in float64, shaped [B, 1, 1, 1]; t = -1 is the clean end."""
    ab = np.append(_alphas_cumprod(), 1.0)[np.asarray(t)]
    return np.sqrt(ab).reshape(-1, 1, 1, 1), np.sqrt(1.0 - ab).reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(torch.from_numpy(_alphas_cumprod()))


def _draws(n: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 3, 3, generator=g, dtype=dtype), torch.randn(n, 4, 3, 3, generator=g, dtype=dtype))


# -- parity with diffusers -----------------------------------------------------------------------------


def test_from_scheduler_and_its_config_give_the_independent_schedule():
    ddpm = DDPMScheduler(**SCHEDULE_CONFIG)
    expected = torch.from_numpy(_alphas_cumprod())
    for source in (ddpm, dict(ddpm.config)):
        ac = NoiseSchedule.from_scheduler(source).alphas_cumprod
        assert ac.dtype == torch.float64 and len(ac) == 1000
        torch.testing.assert_close(ac, expected, rtol=1e-6, atol=0)  # diffusers builds ᾱ in float32


def test_add_noise_matches_ddpm_scheduler():
    ddpm = DDPMScheduler(**SCHEDULE_CONFIG)
    ours = NoiseSchedule.from_scheduler(ddpm)
    x0, eps = _draws(len(TIMESTEPS), torch.float32)
    t = torch.tensor(TIMESTEPS)
    expected = ddpm.add_noise(x0, eps, t)
    got = ours.add_noise(x0, eps, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # one timestep for the whole batch
    torch.testing.assert_close(ours.add_noise(x0, eps, 321), ddpm.add_noise(x0, eps, torch.full((len(t),), 321)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("source", ["epsilon", "sample"])
def test_to_v_matches_ddpm_get_velocity(source):
    ddpm = DDPMScheduler(**SCHEDULE_CONFIG)
    ours = NoiseSchedule.from_scheduler(ddpm)
    x0, eps = _draws(len(TIMESTEPS), torch.float32, seed=1)
    t = torch.tensor(TIMESTEPS)
    x_t = ddpm.add_noise(x0, eps, t)
    expected = ddpm.get_velocity(x0, eps, t)
    pred = eps if source == "epsilon" else x0
    # x₀ from ε at t = 999 divides by α ≈ 0.07, ε from x₀ at t = 0 by σ ≈ 0.03: float32 error grows ~30x
    torch.testing.assert_close(ours.to_v(pred, x_t, t, source), expected, rtol=1e-5, atol=2e-5)


# -- round trips ---------------------------------------------------------------------------------------


def _known_predictions(x0: torch.Tensor, eps: torch.Tensor, t) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x_t and the exact ε, v and x₀ of the draw, computed in float64 NumPy."""
    alpha, sigma = _coefficients(t)
    x0n, epsn = x0.double().numpy(), eps.double().numpy()
    x_t = alpha * x0n + sigma * epsn
    v = alpha * epsn - sigma * x0n
    as_tensor = lambda a: torch.from_numpy(a).to(x0.dtype)
    return as_tensor(x_t), {"epsilon": eps, "sample": x0, "v_prediction": as_tensor(v)}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 3e-5)])
def test_every_conversion_recovers_the_known_prediction(schedule, dtype, tol):
    x0, eps = _draws(len(TIMESTEPS), dtype, seed=2)
    t = torch.tensor(TIMESTEPS)
    x_t, known = _known_predictions(x0, eps, TIMESTEPS)
    for source in PREDICTION_TYPES:
        for target in PREDICTION_TYPES:
            got = schedule.convert(known[source], x_t, t, source, target)
            assert got.dtype == dtype
            torch.testing.assert_close(got, known[target], rtol=tol, atol=tol, msg=f"{source} -> {target}")
    # the named conversions are the same maps, and one timestep for the batch works as a per-sample one
    for step in (0, 999):
        x_t1, known1 = _known_predictions(x0, eps, [step] * len(TIMESTEPS))
        for source in PREDICTION_TYPES:
            named = ((schedule.to_eps, "epsilon"), (schedule.to_x0, "sample"), (schedule.to_v, "v_prediction"))
            for how, target in named:
                torch.testing.assert_close(how(known1[source], x_t1, step, source), known1[target], rtol=tol, atol=tol)


def test_clean_end(schedule):
    x0, eps = _draws(2, seed=3)
    assert float(schedule.alpha_bar(-1)) == 1.0
    # at t = -1, x_t is x₀: x₀ of any prediction is x_t
    torch.testing.assert_close(schedule.to_x0(eps, x0, -1, "epsilon"), x0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="clean end"):
        schedule.to_eps(x0, x0, -1, "sample")
    with pytest.raises(ValueError, match="clean end"):
        schedule.to_eps(x0, x0, torch.tensor([10, -1]), "sample")  # one sample of the batch is enough


# -- DDIM ----------------------------------------------------------------------------------------------


def test_ddim_step_to_the_clean_end_returns_x0(schedule):
    x_t, x0 = _draws(3, torch.float32, seed=4)
    for t in (0, 500, 999):
        assert torch.equal(schedule.ddim_step(x_t, x0, t, -1), x0)
    assert torch.equal(schedule.ddim_step(x_t, x0, torch.tensor([3, 400, 999]), torch.tensor([-1, -1, -1])), x0)


def _fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A fixed, timestep-dependent stand-in for a network."""
    return 0.6 * x * np.cos(t / 300.0) + 0.2 * torch.sin(x + t / 1000.0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_ddim_sampling_matches_diffusers_ddim(prediction_type, steps):
    ref = DDIMScheduler.from_config(dict(SCHEDULE_CONFIG, prediction_type=prediction_type),
                                    timestep_spacing="trailing", set_alpha_to_one=True)
    ref.set_timesteps(steps)
    ours = NoiseSchedule.from_scheduler(ref)
    grid = trailing_timesteps(steps)
    assert ref.timesteps.tolist() == grid
    x_ref = x_ours = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(steps))
    for i, t in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < steps else -1
        x_ref = ref.step(_fake_model(x_ref, t), t, x_ref).prev_sample
        x0 = ours.to_x0(_fake_model(x_ours, t), x_ours, t, prediction_type)
        x_ours = ours.ddim_step(x_ours, x0, t, t_prev)
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5, msg=f"after step {i} (t={t})")


def test_ddim_step_per_sample_timesteps_is_the_closed_form(schedule):
    x_t, x0 = _draws(3, seed=5)
    t, t_prev = [999, 600, 10], [749, 100, -1]
    alpha, sigma = _coefficients(t)
    alpha_prev, sigma_prev = _coefficients(t_prev)
    eps = (x_t.numpy() - alpha * x0.numpy()) / sigma
    expected = torch.from_numpy(alpha_prev * x0.numpy() + sigma_prev * eps)
    got = schedule.ddim_step(x_t, x0, torch.tensor(t), torch.tensor(t_prev))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t, s", [(999, 499), (750, 500), (300, 299), (10, -1), ([999, 600, 40], [749, 100, -1])])
def test_x0_from_two_points_takes_a_ddim_step_onto_x_s(schedule, t, s):
    n = len(t) if isinstance(t, list) else 3
    x_t, x_s = _draws(n, seed=6)
    t_arg, s_arg = (torch.tensor(t), torch.tensor(s)) if isinstance(t, list) else (t, s)
    x0 = schedule.x0_from_two_points(x_t, t_arg, x_s, s_arg)
    # a DDIM step from (x_t, t) with this x₀, in float64 NumPy
    alpha_t, sigma_t = _coefficients(t if isinstance(t, list) else [t] * n)
    alpha_s, sigma_s = _coefficients(s if isinstance(s, list) else [s] * n)
    x0n = x0.numpy()
    landed = alpha_s * x0n + sigma_s * (x_t.numpy() - alpha_t * x0n) / sigma_t
    np.testing.assert_allclose(landed, x_s.numpy(), rtol=1e-9, atol=1e-9)
    if s == -1:
        assert torch.equal(x0, x_s)


# -- the trailing grid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64])
def test_trailing_timesteps_match_diffusers_and_nest(steps):
    ref = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    grid = trailing_timesteps(steps)
    assert grid == ref.timesteps.tolist()
    assert grid[0] == 999 and len(set(grid)) == steps
    assert trailing_timesteps(2 * steps)[::2] == grid


@pytest.mark.parametrize("steps", [3, 7, 50, 1000])
def test_trailing_timesteps_match_diffusers_for_other_counts(steps):
    ref = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert trailing_timesteps(steps) == ref.timesteps.tolist()


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alphas", [[0.0, 0.5], [0.5, 0.0, 0.0], [1.2, 0.5], [0.9, -0.1], [0.9, float("nan")]])
def test_alphas_outside_the_unit_interval_are_refused(alphas):
    with pytest.raises(ValueError, match=r"alphas_cumprod must lie in \(0, 1\] \(0 only at the last timestep"):
        NoiseSchedule(torch.tensor(alphas))


def test_zero_terminal_snr_converts_v_and_x0_and_refuses_epsilon():
    """diffusers' rescaled betas end at ᾱ = 0 (x_t = ε there): v and x₀ convert as DDIM reads them; ε cannot."""
    ddim = DDIMScheduler(**{**SCHEDULE_CONFIG, "prediction_type": "v_prediction"}, rescale_betas_zero_snr=True,
                         timestep_spacing="trailing")
    schedule = NoiseSchedule.from_scheduler(ddim.config)
    assert schedule.zero_terminal_snr and float(schedule.alpha_bar(999)) == 0.0 and float(schedule.snr(999)) == 0.0
    x, v = _draws(2, dtype=torch.float32)
    ddim.set_timesteps(1)
    expected = ddim.step(v, 999, x).pred_original_sample  # α x - σ v with α = 0: -v
    torch.testing.assert_close(schedule.to_x0(v, x, 999, "v_prediction"), expected, rtol=0, atol=0)
    torch.testing.assert_close(schedule.to_eps(v, x, 999, "v_prediction"), x, rtol=0, atol=0)
    torch.testing.assert_close(schedule.add_noise(v, x, 999), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ε-prediction at zero SNR"):
        schedule.to_x0(v, x, [999, 500], "epsilon")
    schedule.to_x0(v, x, [998, 500], "epsilon")  # ε is fine wherever ᾱ > 0


@pytest.mark.parametrize("alphas", [[], [[0.5, 0.4]]])
def test_alphas_of_the_wrong_shape_are_refused(alphas):
    with pytest.raises(ValueError, match="non-empty 1-d"):
        NoiseSchedule(torch.tensor(alphas))


@pytest.mark.parametrize("t", [1000, -2, [5, 1000]])
def test_timesteps_out_of_range_are_refused(schedule, t):
    x = torch.zeros(2 if isinstance(t, list) else 1, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 999\]"):
        schedule.add_noise(x, x, t)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 999\]"):
        schedule.ddim_step(x, x, 999 if not isinstance(t, list) else [999, 999], t)


def test_unknown_prediction_type_is_named(schedule):
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    for call in (lambda: schedule.to_x0(x, x, 5, "flow"), lambda: schedule.to_eps(x, x, 5, "flow"),
                 lambda: schedule.to_v(x, x, 5, "flow"), lambda: schedule.convert(x, x, 5, "flow", "epsilon"),
                 lambda: schedule.convert(x, x, 5, "epsilon", "flow")):
        with pytest.raises(ValueError, match="unknown prediction type 'flow'"):
            call()


@pytest.mark.parametrize("steps", [0, 1001])
def test_trailing_timesteps_refuse_bad_step_counts(steps):
    with pytest.raises(ValueError, match=rf"steps must be in \[1, 1000\], got {steps}"):
        trailing_timesteps(steps)
