"""The offline profile of a served tandem: how long each stage's batch takes on this machine, by batch size.

``tandem serve --profile OUT`` measures it (:func:`measure_profile`) and the load-aware policy reads it
(:class:`Profile`). A profile holds the seconds of one batch of the student (draw and decode), the oracle (score)
and the teacher (improve and decode, with the tandem's default strategy), each the median of a few repeats, with
the PyTorch threads and the settings it was measured at: a profile from other threads or another machine does
not describe this one.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import count
from .engine import Engine
from .requests import default_plan

PROFILE_STAGES = ("student", "oracle", "teacher")


@dataclass
class Profile:
    """``stages[stage][batch_size]``: the seconds of one batch (``batch_size`` images) of each stage."""

    stages: dict[str, dict[int, float]]
    threads: int
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        for stage in PROFILE_STAGES:
            sizes = self.stages.get(stage)
            if not sizes:
                raise ValueError(f"the profile has no timings of stage {stage!r}")
            for b, s in sizes.items():
                if int(b) < 1 or not (s > 0 and s < float("inf")):
                    raise ValueError(f"the profile's {stage} batch of {b} images took {s!r} s; expected a "
                                     "positive batch size and a positive finite time")
        self.stages = {stage: {int(b): float(s) for b, s in sorted(sizes.items(), key=lambda kv: int(kv[0]))}
                       for stage, sizes in self.stages.items()}

    def batch_seconds(self, stage: str, batch: int) -> float:
        """Seconds of one batch of ``batch`` images: measured, interpolated linearly between measured sizes, or
        beyond the largest at its per-image rate."""
        sizes = self.stages[stage]
        keys = list(sizes)
        if batch in sizes:
            return sizes[batch]
        if batch < keys[0]:
            return sizes[keys[0]] * batch / keys[0]
        if batch > keys[-1]:
            return sizes[keys[-1]] * batch / keys[-1]
        hi = next(k for k in keys if k > batch)
        lo = keys[keys.index(hi) - 1]
        return sizes[lo] + (sizes[hi] - sizes[lo]) * (batch - lo) / (hi - lo)

    def seconds_per_image(self, stage: str, batch: int) -> float:
        return self.batch_seconds(stage, batch) / batch

    def to_json(self) -> dict:
        return {"stages": {s: {str(b): t for b, t in sizes.items()} for s, sizes in self.stages.items()},
                "threads": self.threads, "config": self.config}

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(data["stages"], int(data["threads"]), dict(data.get("config", {})))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a serving profile (write one with `tandem serve --profile`): {e}") from None


@torch.no_grad()
def measure_profile(pipe, prompts: list[str], batch_sizes=(1, 2, 4, 8), repeats: int = 3, seed: int = 0,
                    callback=None) -> Profile:
    """Time each stage of ``pipe`` (a TandemPipeline) at each batch size on the server's own code path
    (:meth:`tandem.serve.engine.Engine.compute`, with the pipeline's default settings, every image of a batch
    going on to the teacher): the median of ``repeats`` batches, after one warm-up batch per size. ``prompts``
    are cycled to fill a batch; ``callback(batch_size)`` follows each size."""
    repeats = count(repeats, "repeats")
    plan = default_plan(pipe)
    engine = Engine(pipe)
    timings: dict[str, dict[int, float]] = {s: {} for s in PROFILE_STAGES}
    for b in batch_sizes:
        b = count(b, "batch size")
        seconds = {s: [] for s in PROFILE_STAGES}
        for r in range(repeats + 1):
            job = engine.job([prompts[i % len(prompts)] for i in range(b)], plan, seed + r)
            for stage in PROFILE_STAGES:
                seconds[stage].append(engine.compute(stage, job.images))
        for stage in PROFILE_STAGES:
            timings[stage][b] = statistics.median(seconds[stage][1:])
        if callback is not None:
            callback(b)
    config = {"plan": plan.settings(), "batch_sizes": [int(b) for b in batch_sizes], "repeats": repeats,
              "seed": seed, "prompts": len(prompts)}
    return Profile(timings, torch.get_num_threads(), config)
