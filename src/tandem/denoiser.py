"""The one denoiser contract: how ε-, v- and x₀-predictions, noisy latents and DDIM steps relate.

A variance-preserving schedule has ``x_t = α_t x₀ + σ_t ε`` with ``α_t = sqrt(ᾱ_t)`` and
``σ_t = sqrt(1 - ᾱ_t)``; a network predicts one of

* ``epsilon``: ε,
* ``v_prediction``: ``v = α_t ε - σ_t x₀`` (Salimans & Ho 2022),
* ``sample``: x₀ itself (diffusers' name for an x₀-prediction).

Every coefficient is computed in float64 from ᾱ and only then cast to the tensor's dtype, so a
conversion and its inverse agree to the tensor's precision at every timestep (``ᾱ`` near 0 or 1
included). Timestep ``-1`` means "the clean end" (``ᾱ = 1``): a DDIM step to ``-1`` returns x₀,
as the last step of a sampler does. A schedule may end at zero SNR (``ᾱ = 0`` at its last timestep:
diffusers' ``rescale_betas_zero_snr``, Lin et al. 2024); there ``x_t = ε``, so an ε-prediction
implies no x₀ and is refused, while v- and x₀-predictions convert as everywhere else.

Samplers, distillation targets and the adaptive pipeline's re-noising all use this module; no
other file converts between parameterisations.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CLEAN = -1  # the timestep index of the clean end (ᾱ = 1)


class NoiseSchedule:
    """ᾱ of a diffusion schedule (float64) and the conversions of the denoiser contract.

    Args:
        alphas_cumprod: ᾱ_t for t = 0 .. T-1 (any float dtype; kept in float64).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if ac.ndim != 1 or len(ac) == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-d tensor, got shape {tuple(ac.shape)}")
        inside = (ac > 0) & (ac <= 1)
        inside[-1] = (ac[-1] >= 0) & (ac[-1] <= 1)  # zero terminal SNR: ᾱ = 0 at the last timestep only
        if not bool(inside.all()):
            raise ValueError("alphas_cumprod must lie in (0, 1] (0 only at the last timestep: zero terminal SNR)")
        self.alphas_cumprod = ac
        self.zero_terminal_snr = bool(ac[-1] == 0)

    @classmethod
    def from_scheduler(cls, scheduler_or_config) -> NoiseSchedule:
        """The schedule of a diffusers scheduler (or of its config: betas are rebuilt by ``DDPMScheduler``)."""
        if hasattr(scheduler_or_config, "alphas_cumprod"):
            return cls(scheduler_or_config.alphas_cumprod)
        from diffusers import DDPMScheduler

        return cls(DDPMScheduler.from_config(dict(scheduler_or_config)).alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t) -> torch.Tensor:
        """ᾱ at integer timesteps ``t`` (a tensor, list or int; ``-1`` is the clean end), float64 on the CPU."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if bool(((t < CLEAN) | (t >= self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}], got {t.tolist()}")
        padded = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # index -1 -> 1
        return padded[t]

    def coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α_t, σ_t)`` shaped to broadcast over ``like`` [B, ...] (one timestep or one per sample),
        computed in float64 and cast to ``like``'s dtype and device."""
        ab = self.alpha_bar(t)
        alpha, sigma = ab.sqrt(), (1.0 - ab).sqrt()
        return _shaped(alpha, like), _shaped(sigma, like)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ``α²/σ²`` at ``t`` (float64)."""
        ab = self.alpha_bar(t)
        return ab / (1.0 - ab)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """``x_t = α_t x₀ + σ_t ε``."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """x₀ implied by a prediction of ``prediction_type`` at ``x_t``."""
        alpha, sigma = self.coefficients(t, x_t)
        kind = _kind(prediction_type)
        if kind == "epsilon":
            if self.zero_terminal_snr and bool((self.alpha_bar(t) == 0).any()):
                raise ValueError("an ε-prediction at zero SNR (ᾱ = 0) implies no x0; use a v- or x0-prediction")
            return (x_t - sigma * pred) / alpha
        if kind == "v_prediction":
            return alpha * x_t - sigma * pred
        return pred

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """ε implied by a prediction of ``prediction_type`` at ``x_t`` (x₀ at ``σ = 0`` has no ε: refused)."""
        alpha, sigma = self.coefficients(t, x_t)
        kind = _kind(prediction_type)
        if kind == "epsilon":
            return pred
        if kind == "v_prediction":
            return sigma * x_t + alpha * pred
        if bool((self.alpha_bar(t) >= 1).any()):
            raise ValueError("an x0-prediction at the clean end (t = -1) implies no noise")
        return (x_t - alpha * pred) / sigma

    def to_v(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """v implied by a prediction of ``prediction_type`` at ``x_t``."""
        alpha, sigma = self.coefficients(t, x_t)
        if _kind(prediction_type) == "v_prediction":
            return pred
        x0 = self.to_x0(pred, x_t, t, prediction_type)
        eps = self.to_eps(pred, x_t, t, prediction_type)
        return alpha * eps - sigma * x0

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, source: str, target: str) -> torch.Tensor:
        """A prediction of type ``source`` as one of type ``target``."""
        how = {"epsilon": self.to_eps, "v_prediction": self.to_v, "sample": self.to_x0}[_kind(target)]
        return how(pred, x_t, t, source)

    def ddim_step(self, x_t: torch.Tensor, x0: torch.Tensor, t, t_prev) -> torch.Tensor:
        """One deterministic DDIM step (η = 0) from ``t`` to ``t_prev`` given the model's x₀ at ``x_t``:
        ``x_prev = α_prev x₀ + σ_prev ε̂`` with ``ε̂`` the noise that puts x₀ at ``x_t``. ``t_prev = -1``
        returns x₀."""
        alpha, sigma = self.coefficients(t, x_t)
        alpha_prev, sigma_prev = self.coefficients(t_prev, x_t)
        eps = (x_t - alpha * x0) / sigma
        return alpha_prev * x0 + sigma_prev * eps

    def x0_from_two_points(self, x_t: torch.Tensor, t, x_s: torch.Tensor, s) -> torch.Tensor:
        """The x₀ for which one DDIM step from ``(x_t, t)`` lands on ``x_s`` at ``s < t`` (Salimans & Ho
        2022, Algorithm 2: ``x̃ = (x_s - (σ_s/σ_t) x_t) / (α_s - (σ_s/σ_t) α_t)``); ``s = -1`` gives ``x_s``."""
        alpha_t, sigma_t = self.coefficients(t, x_t)
        alpha_s, sigma_s = self.coefficients(s, x_t)
        ratio = sigma_s / sigma_t
        return (x_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``steps`` descending timesteps ending at the noisiest, spaced ``T/steps`` apart (diffusers'
    ``timestep_spacing="trailing"``: ``round(T - i T/steps) - 1``). For power-of-two step counts the
    grid of ``n`` steps is every other point of the grid of ``2n``, as progressive distillation needs."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]


def _kind(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def _shaped(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 scalar or per-sample vector as [B, 1, 1, ...] (or a scalar) in ``like``'s dtype and device."""
    v = v.to(like.dtype).to(like.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))
