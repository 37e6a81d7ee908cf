"""Reflected diffusion for distillation: thresholding x₀ estimates to the data's support.

DDIL (Garrepalli et al., section 3, "Reflected Diffusion Distillation") thresholds the teacher's
x₀ estimates (and, in consistency distillation, the student-derived target; in DMD2, the real score,
the fake critic and the student) so that no network is asked to follow an estimate outside the
support of the data: the discrete counterpart of a reflected diffusion (Lou & Ermon 2023, whose
reflected SDE is the limit that thresholding approximates). The paper gives no formula for latent
space; tandem offers the two thresholdings of the literature, as :class:`Reflection`:

* ``static``: clip to the data's range, ``x₀ ← clip(x₀, lo, hi)`` (diffusers' ``clip_sample`` when
  ``lo = -hi``), each latent channel to its own range (``static``, the default: the world's channels
  span [-6.9, 2.2], [-5.2, 2.5], [-4.5, 4.1] and [-1.9, 0.4], far narrower than the one range
  [-6.9, 4.1] they share) or every channel to the one range (``static:global``, or ``static:LO,HI``).
  The world's ranges are measured once on VAE latents of its training renderings (``latent_range.json``
  beside the model; :mod:`tandem.distill.latent_range` measures it: ``python -m tandem.distill.latent_range
  world --write``).
* ``dynamic``: Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3) for data in
  ``[-R, R]``: per sample ``s = max(R, quantile(|x₀|, P))`` and ``x₀ ← clip(x₀, -s, s) / s · R``.
  With ``R = 1`` it is exactly diffusers' ``_threshold_sample`` (no ``sample_max_value`` cap); in
  latent space ``R`` is the latents' bound (``max(|lo|, |hi|)`` of the measured range), so estimates
  that look like data are left alone and outlying ones are pulled back and rescaled.

A DDIM step from a thresholded x₀ goes on with the noise that x₀ implies at ``x_t`` (Glide's and Imagen's
choice, diffusers' ``use_clipped_model_output=True``; DPM-Solver++ and
:meth:`~tandem.denoiser.NoiseSchedule.ddim_step` do so by construction), in training and sampling alike.

At sampling time a reflected student applies the same function to each x₀ its sampler computes:
:func:`install` puts it in diffusers' own thresholding hook (``thresholding=True`` makes
``DPMSolverMultistepScheduler``, ``DDIMScheduler`` and ``LCMScheduler`` call ``_threshold_sample``
on their x₀ prediction), and :func:`tandem.sampling.consistency_sample` takes it as ``reflect``.
The saved scheduler config keeps ``thresholding: false`` (diffusers' own formula caps ``s`` at 1 for
pixel data); :func:`tandem.load_student` installs the student's ``details["reflect"]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checks import read_json_file

RANGE_FILE = "latent_range.json"
MODES = ("static", "dynamic")
SCOPES = ("channel", "global")  # static: each latent channel to its own measured range, or all to one
DEFAULT_PERCENTILE = 0.995  # Imagen's and diffusers' dynamic_thresholding_ratio


@dataclass(frozen=True)
class Reflection:
    """A thresholding of x₀ estimates (module docstring); ``None`` fields are filled by :meth:`resolved`.

    Attributes:
        mode: ``static`` or ``dynamic``.
        lo, hi: static: the range clipped to, one number for every channel or a tuple of one per channel [the
            model's measured per-channel ranges; with ``scope="global"``, its one range].
        scope: static, unresolved: ``"channel"`` or ``"global"``, which measured range :meth:`resolved` takes.
        percentile: dynamic: ``P`` of ``quantile(|x₀|, P)`` [0.995].
        bound: dynamic: the data's bound ``R`` [``max(|lo|, |hi|)`` of the model's measured range].
    """

    mode: str
    lo: float | tuple[float, ...] | None = None
    hi: float | tuple[float, ...] | None = None
    percentile: float | None = None
    bound: float | None = None
    scope: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown reflection {self.mode!r}; expected one of {', '.join(MODES)} (or off)")
        for name in ("lo", "hi"):  # a list (as JSON gives it) is a tuple of per-channel bounds
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("lo", "hi", "percentile", "bound"):
            value = getattr(self, name)
            for v in value if isinstance(value, tuple) and name in ("lo", "hi") else (value,):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                    raise ValueError(f"reflection {name} must be a finite number (or one per channel), got {value!r}")
        if self.mode == "static":
            if self.percentile is not None or self.bound is not None:
                raise ValueError("static reflection takes a range lo,hi only")
            if (self.lo is None) != (self.hi is None):
                raise ValueError("static reflection needs both lo and hi, or neither (the measured range)")
            if self.scope not in (None, *SCOPES) or (self.scope is not None and self.lo is not None):
                raise ValueError(f"static reflection's scope is one of {SCOPES}, for a range still to be measured")
            if self.lo is not None:
                lo, hi = (self.lo, self.hi) if isinstance(self.lo, tuple) else ((self.lo,), (self.hi,))
                if isinstance(self.lo, tuple) != isinstance(self.hi, tuple) or len(lo) != len(hi) or not lo:
                    raise ValueError(f"static reflection needs lo and hi alike: one number each, or one per channel "
                                     f"for as many channels, got {self.lo}, {self.hi}")
                if not all(a < b for a, b in zip(lo, hi)):
                    raise ValueError(f"static reflection needs lo < hi, got {self.lo}, {self.hi}")
        else:
            if self.lo is not None or self.hi is not None or self.scope is not None:
                raise ValueError("dynamic reflection takes a percentile and a bound, not a range")
            if self.percentile is not None and not 0 < self.percentile <= 1:
                raise ValueError(f"dynamic reflection's percentile must lie in (0, 1], got {self.percentile}")
            if self.bound is not None and not self.bound > 0:
                raise ValueError(f"dynamic reflection's bound must be > 0, got {self.bound}")

    @classmethod
    def parse(cls, text: str | None) -> Reflection | None:
        """``static`` (each channel to its measured range), ``static:global`` (every channel to the one measured
        range), ``static:LO,HI``, ``dynamic``, ``dynamic:P`` or ``dynamic:P,BOUND``; ``off`` or None: None."""
        if text is None or text.strip() == "off":
            return None
        mode, _, args = text.strip().partition(":")
        if mode not in MODES:
            raise ValueError(f"--reflect {text!r}: expected static[:global|:LO,HI], dynamic[:P[,BOUND]] or off")
        if mode == "static" and args.strip() in ("global", "channel"):
            return cls("static", scope=args.strip())
        try:
            numbers = [float(a) for a in args.split(",")] if args else []
        except ValueError:
            raise ValueError(f"--reflect {text!r}: {args!r} is not a list of numbers") from None
        if mode == "static":
            if len(numbers) not in (0, 2):
                raise ValueError(f"--reflect {text!r}: static takes two numbers LO,HI (or none: the measured range)")
            return cls("static", *numbers) if numbers else cls("static")
        if len(numbers) > 2:
            raise ValueError(f"--reflect {text!r}: dynamic takes P or P,BOUND")
        return cls("dynamic", percentile=numbers[0] if numbers else None, bound=numbers[1] if len(numbers) > 1 else None)

    def resolved(self, model_dir: str | Path | None) -> Reflection:
        """This reflection with every default filled: the percentile's, and the range or bound from
        ``model_dir/latent_range.json`` (an error naming the file when it is needed and absent)."""
        percentile = self.percentile if self.percentile is not None or self.mode == "static" else DEFAULT_PERCENTILE
        needs_range = (self.lo is None) if self.mode == "static" else (self.bound is None)
        if not needs_range:
            return Reflection(self.mode, self.lo, self.hi, percentile, self.bound)
        measured = read_latent_range(model_dir)
        if self.mode == "static":
            if self.scope == "global":
                return Reflection("static", measured["lo"], measured["hi"])
            channels = measured.get("per_channel") or {}
            lo, hi = channels.get("lo"), channels.get("hi")
            if not (isinstance(lo, list) and isinstance(hi, list) and lo and len(lo) == len(hi)):
                raise ValueError(f"{Path(model_dir) / RANGE_FILE} has no per-channel ranges (per_channel.lo, .hi): "
                                 "measure it again, or give --reflect static:global")
            return Reflection("static", tuple(lo), tuple(hi))
        return Reflection("dynamic", percentile=percentile, bound=measured["bound"])

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` [B, ...] thresholded (the same dtype; computed in float32 for half inputs, as diffusers does)."""
        if self.mode == "static":
            if self.lo is None:
                raise ValueError("this reflection is not resolved (no range); call resolved(model_dir) first")
            if not isinstance(self.lo, tuple):
                return x0.clamp(self.lo, self.hi)
            if x0.ndim < 2 or x0.shape[1] != len(self.lo):
                raise ValueError(f"per-channel reflection of {len(self.lo)} channels, given x0 of shape "
                                 f"{list(x0.shape)}")
            shape = (1, len(self.lo)) + (1,) * (x0.ndim - 2)
            lo = torch.tensor(self.lo, dtype=x0.dtype, device=x0.device).reshape(shape)
            hi = torch.tensor(self.hi, dtype=x0.dtype, device=x0.device).reshape(shape)
            return torch.maximum(torch.minimum(x0, hi), lo)
        if self.percentile is None or self.bound is None:
            raise ValueError("this reflection is not resolved (no percentile or bound); call resolved(model_dir) first")
        dtype = x0.dtype
        x = x0 if dtype in (torch.float32, torch.float64) else x0.float()
        flat = x.reshape(x.shape[0], -1)
        s = torch.quantile(flat.abs(), self.percentile, dim=1).clamp(min=self.bound).unsqueeze(1)
        return (flat.clamp(-s, s) / s * self.bound).reshape(x0.shape).to(dtype)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> Reflection:
        """The reflection a ``student.json`` or run config records (a ValueError naming what is wrong)."""
        if not isinstance(data, dict) or not set(data) <= {"mode", "lo", "hi", "percentile", "bound", "scope"}:
            raise ValueError(f"not a reflection: {data!r} (expected mode and lo, hi or percentile, bound)")
        return cls(**data).resolved(None)


def reflected(reflection: Reflection | None, x0: torch.Tensor) -> torch.Tensor:
    """``reflection(x0)``, or ``x0`` itself (the same tensor) when there is no reflection."""
    return x0 if reflection is None else reflection(x0)


# -- sampling time ----------------------------------------------------------------------------------------

def install(scheduler, reflection: Reflection | None):
    """Make a diffusers scheduler threshold its x₀ predictions with ``reflection`` (in place; returned).

    ``DPMSolverMultistepScheduler`` (``dpmsolver++``), ``DDIMScheduler`` and ``LCMScheduler`` call
    ``self._threshold_sample(x0)`` when ``config.thresholding`` is set; this sets it and makes that
    method ``reflection``. Schedulers without the hook are refused. A copy keeps the reflection
    (``copy.deepcopy``); a scheduler rebuilt with ``from_config`` does not (install it again)."""
    if reflection is None:
        return scheduler
    if not hasattr(scheduler, "_threshold_sample") or "thresholding" not in scheduler.config:
        raise ValueError(f"{type(scheduler).__name__} has no thresholding hook; a reflected student needs "
                         "DPMSolverMultistepScheduler, DDIMScheduler or LCMScheduler")
    if scheduler.config.get("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError("a reflected DPM-Solver must be dpmsolver++ (the other forms never threshold x0)")
    scheduler.register_to_config(thresholding=True)
    scheduler._threshold_sample = reflection
    return scheduler


def student_reflection(info) -> Reflection | None:
    """The reflection a student samples with (its ``student.json`` ``details["reflect"]``), or None."""
    data = (info.details or {}).get("reflect") if info is not None else None
    return Reflection.from_json(data) if data else None


# -- the data's range ------------------------------------------------------------------------------------

def read_latent_range(model_dir: str | Path | None) -> dict:
    """The measured latent range of a model (``lo``, ``hi``, ``bound``) from ``model_dir/latent_range.json``."""
    path = Path(model_dir) / RANGE_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        raise ValueError(f"--reflect needs the data's latent range, and {path or 'this teacher'} does not exist: give "
                         f"it (static:LO,HI or dynamic:P,BOUND), or measure it with `python -m "
                         "tandem.distill.latent_range MODEL --write [--data IMAGES]`")
    data = read_json_file(path, "latent range")
    if not all(isinstance(data.get(k), int | float) for k in ("lo", "hi", "bound")):
        raise ValueError(f"{path} lacks numbers lo, hi and bound")
    return data
