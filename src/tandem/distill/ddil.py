"""DDIL: where a distillation method's training inputs come from (Garrepalli et al., *DDIL: Improved
Diffusion Distillation with Imitation Learning*, Algorithms 1-3 and section 4.2).

A wrapper around a method, not a method. A method that trains on noisy latents ``z_t`` at timesteps of
a grid (progressive distillation's student grid, consistency distillation's skipping grid, DMD2's
student grid) asks :class:`DDILSampler` for them; per mini-batch the sampler draws the source
(Algorithm 1) with priors ``β_frwd / β_teach_bckwrd / β_student_bckwrd``:

* **forward**: ``z_t = α_t x + σ_t ε`` from the batch's data (what every method does without DDIL);
* **teacher backward**: the teacher rolled from pure noise ``ε`` down to ``t`` on its DDIM grid (the
  stateless DDIM step of Algorithm 1, :meth:`~tandem.denoiser.NoiseSchedule.ddim_step`);
* **student backward**: the student rolled down with its own steps. With ``mixed=β`` the rollout is
  Algorithm 2's: each transition of the student's grid is the student's (one step) with probability
  ``β``, else the teacher's (its grid points in between; two DDIM steps in progressive distillation).
  With ``buffer=N`` the rollout runs the whole student grid and its visited states go to a DAgger
  buffer (bounded, first in first out, kept in the method's checkpoint) from which the batch is then
  drawn (Algorithm 3): the batch's caption, guidance and timestep come with each state.

Every rollout starts from the method's own noise ``ε``, runs without gradients on the whole batch,
and its cost (UNet calls of teacher and student) is returned for the log. Randomness comes from the
step's generator only (the source, the per-transition choices, consistency students' fresh noise,
the buffer's draws), so a resumed run is bitwise the same.

The spec, ``--ddil "frwd=0.5,teacher=0.25,student=0.25"``, names the priors, which must sum to 1,
and optionally ``mixed=β`` (the student's share of each transition, [1]), ``buffer=N`` (DAgger
buffer size, [0: none]), ``ramp=K`` (the student share grows linearly from 0 over the first K steps
of the run, or of each halving round in progressive distillation; forward diffusion takes the
rest) and ``teacher_steps=K`` (the teacher's rollouts on the trailing K-step grid [the method's]).
The paper's progressive setting is ``frwd=0.75,student=0.25,mixed=0.15,buffer=...`` (appendix A).

**Two phases** (the paper's schedule): from step ``phase2=K`` on, the student's share becomes
``phase2_student`` (about 0.8 in the paper; forward diffusion takes what the teacher leaves) and a share
``replay`` of every batch (half in the paper) is drawn again from the DAgger buffer (Algorithm 2's aggregated
dataset), the rest from the source drawn as before. Before step K the priors above hold (about 15% student).
``phase2=0`` (the default) is one phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from ..denoiser import NoiseSchedule, trailing_timesteps
from ..training.checks import require_number

SOURCES = ("frwd", "teacher", "student")
_INTEGERS = ("buffer", "ramp", "teacher_steps", "phase2")


@dataclass(frozen=True)
class DDILSpec:
    """The sampling priors and options of DDIL (module docstring)."""

    frwd: float = 1.0  # β_frwd: forward diffusion of the data
    teacher: float = 0.0  # β_teach_bckwrd: the teacher's backward trajectories
    student: float = 0.0  # β_student_bckwrd: the student's (mixed) backward trajectories
    mixed: float = 1.0  # β of Algorithm 2: probability that the student takes a transition of its rollout
    buffer: int = 0  # DAgger buffer size (0: student rollouts are used as they are drawn)
    ramp: int = 0  # steps over which the student share grows from 0 to `student`
    teacher_steps: int | None = None  # the teacher's rollout grid (trailing spacing) [the method's]
    phase2: int = 0  # the step the second phase starts at (0: one phase)
    phase2_student: float = 0.8  # the student's prior in the second phase
    replay: float = 0.5  # the share of each second-phase batch drawn again from the DAgger buffer

    def __post_init__(self):
        for name in SOURCES + ("mixed",):
            require_number(getattr(self, name), f"ddil.{name}", at_least=0.0, at_most=1.0)
        total = self.frwd + self.teacher + self.student
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"ddil: the priors frwd + teacher + student must sum to 1, got {total:g} "
                             f"({self.frwd:g} + {self.teacher:g} + {self.student:g})")
        require_number(self.buffer, "ddil.buffer", integer=True, at_least=0)
        require_number(self.ramp, "ddil.ramp", integer=True, at_least=0)
        if self.teacher_steps is not None:
            require_number(self.teacher_steps, "ddil.teacher_steps", integer=True, at_least=1, at_most=1000)
        for name, off in (("mixed", self.mixed == 1), ("buffer", self.buffer == 0), ("ramp", self.ramp == 0)):
            if not off and self.student == 0:
                raise ValueError(f"ddil.{name} applies to the student's rollouts: give student > 0")
        if self.teacher_steps is not None and self.teacher == 0 and self.mixed == 1:
            raise ValueError("ddil.teacher_steps: no rollout uses the teacher (give teacher > 0 or mixed < 1)")
        require_number(self.phase2, "ddil.phase2", integer=True, at_least=0)
        require_number(self.phase2_student, "ddil.phase2_student", at_least=0.0, at_most=1.0)
        require_number(self.replay, "ddil.replay", at_least=0.0, at_most=1.0)
        if self.phase2:
            if self.teacher + self.phase2_student > 1 + 1e-9:
                raise ValueError(f"ddil: in the second phase the priors teacher + phase2_student must be at most 1, "
                                 f"got {self.teacher:g} + {self.phase2_student:g}")
            if self.replay > 0 and self.buffer == 0:
                raise ValueError("ddil.replay draws from the DAgger buffer: give buffer=N (or replay=0)")

    @classmethod
    def parse(cls, text: str) -> DDILSpec:
        """``"frwd=0.5,teacher=0.25,student=0.25[,mixed=B][,buffer=N][,ramp=K][,teacher_steps=K]"``."""
        known = [f.name for f in fields(cls)]
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in known:
                raise ValueError(f"ddil {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(map(repr, known))}")
            if key in values:
                raise ValueError(f"ddil {text!r}: {key!r} is given twice")
            try:
                values[key] = int(value) if key in _INTEGERS else float(value)
            except ValueError:
                kind = "an integer" if key in _INTEGERS else "a number"
                raise ValueError(f"ddil {text!r}: {key!r} must be {kind}, got {value.strip()!r}") from None
        if not any(k in values for k in SOURCES):
            raise ValueError(f"ddil {text!r}: give the priors, e.g. frwd=0.5,teacher=0.25,student=0.25")
        for k in SOURCES:  # the priors given name the split; the others are 0
            values.setdefault(k, 0.0)
        return cls(**values)

    def describe(self) -> str:
        """The spec as ``--ddil`` takes it (options at their defaults left out)."""
        default = DDILSpec()
        return ",".join(f"{k}={v:g}" for k, v in asdict(self).items()
                        if k in SOURCES or v != getattr(default, k))

    def to_json(self) -> dict:
        return asdict(self)

    def in_phase2(self, step: int) -> bool:
        return bool(self.phase2) and step >= self.phase2

    def priors(self, step: int) -> tuple[float, float, float]:
        """``(β_frwd, β_teacher, β_student)`` at ``step`` (the ramp's linear growth of the student share; in the
        second phase, ``phase2_student`` with forward diffusion taking the rest)."""
        if self.in_phase2(step):
            return max(0.0, 1.0 - self.teacher - self.phase2_student), self.teacher, self.phase2_student
        student = self.student * min(1.0, step / self.ramp) if self.ramp else self.student
        return self.frwd + (self.student - student), self.teacher, student


@dataclass
class Denoiser:
    """A model as rollouts call it.

    Attributes:
        x0: ``(x_t [b, C, h, w], t [b], **conditioning rows) -> x₀ [b, C, h, w]``, called without gradients.
        timesteps: its sampling grid, descending from the noisiest (where rollouts start from pure noise).
        calls: UNet calls per evaluation and sample (2 under classifier-free guidance).
        stochastic: steps like a consistency model's sampler (its x₀ re-noised with fresh noise, LCM) rather
            than by DDIM (x₀ and the noise it implies).
    """

    x0: Callable[..., torch.Tensor]
    timesteps: list[int]
    calls: int = 1
    stochastic: bool = False


def _rows(cond: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows.to(v.device)] for k, v in cond.items()}


def _step(model: Denoiser, x: torch.Tensor, t: int, t_next: torch.Tensor, cond: dict, schedule: NoiseSchedule,
          generator: torch.Generator) -> torch.Tensor:
    """One step of ``model`` from ``t`` (every row) to ``t_next`` [b] (per row)."""
    x0 = model.x0(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), **cond)
    if model.stochastic:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return schedule.add_noise(x0, z, t_next)
    return schedule.ddim_step(x, x0, t, t_next)


@torch.no_grad()
def roll(model: Denoiser, x: torch.Tensor, cond: dict[str, torch.Tensor], targets: torch.Tensor, grid: list[int],
         schedule: NoiseSchedule, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Algorithm 1's backward rollout: every sample of ``x`` [B, C, h, w] stands at ``grid[0]``; each moves
    along ``grid`` (descending) through the points above its target timestep (``targets`` [B], at most
    ``grid[0]``), then one step onto the target.

    Returns:
        ``(x at the targets [B, C, h, w], UNet calls)``.
    """
    targets = targets.cpu().long()
    if bool((targets > grid[0]).any()):
        raise ValueError(f"rollout targets {targets.tolist()} lie above the grid's start {grid[0]}")
    x, calls = x.clone(), 0
    for k, t in enumerate(grid):
        rows = (targets < t).nonzero().flatten()
        if rows.numel() == 0:
            break
        t_next = targets[rows].clamp(min=grid[k + 1] if k + 1 < len(grid) else -1)
        x[rows.to(x.device)] = _step(model, x[rows.to(x.device)], t, t_next, _rows(cond, rows), schedule, generator)
        calls += rows.numel() * model.calls
    return x, calls


@dataclass
class Rollout:
    """A mixed rollout's result: the states at the targets, the cost, and who took each transition."""

    x: torch.Tensor  # [B, C, h, w]
    calls: dict[str, int]  # UNet calls of "student" and "teacher"
    by_student: list[torch.Tensor]  # per transition of the student grid: [B] bool (False: the teacher, or none)
    visited: list[tuple[int, torch.Tensor]]  # (timestep, states [B, ...]) where every sample landed on the grid


@torch.no_grad()
def mixed_roll(student: Denoiser, teacher: Denoiser, beta: float, x: torch.Tensor, cond: dict[str, torch.Tensor],
               targets: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator) -> Rollout:
    """Algorithm 2's interactive rollout from ``x`` at ``student.timesteps[0]`` to ``targets`` [B]: each
    transition of the student's grid is, per sample, the student's one step with probability ``beta`` (a
    coin from ``generator``; none is drawn when ``beta`` is 0 or 1), else the teacher's steps through its own
    grid points in between. ``beta = 1`` is the student's own sampler."""
    grid, targets = student.timesteps, targets.cpu().long()
    if bool((targets > grid[0]).any()):
        raise ValueError(f"rollout targets {targets.tolist()} lie above the student grid's start {grid[0]}")
    x = x.clone()
    calls, by_student, visited = {"student": 0, "teacher": 0}, [], []
    for k, t in enumerate(grid):
        rows = (targets < t).nonzero().flatten()
        if rows.numel() == 0:
            break
        t_next = targets[rows].clamp(min=grid[k + 1] if k + 1 < len(grid) else -1)
        if 0 < beta < 1:
            coin = torch.rand((rows.numel(),), generator=generator) < beta
        else:
            coin = torch.full((rows.numel(),), beta >= 1, dtype=torch.bool)
        chose = torch.zeros(x.shape[0], dtype=torch.bool)
        chose[rows] = coin
        by_student.append(chose)
        mine, theirs = rows[coin], rows[~coin]
        if mine.numel():
            x[mine.to(x.device)] = _step(student, x[mine.to(x.device)], t, t_next[coin], _rows(cond, mine), schedule,
                                         generator)
            calls["student"] += mine.numel() * student.calls
        if theirs.numel():
            path = [t] + [g for g in teacher.timesteps if g < t]
            x[theirs.to(x.device)], used = roll(teacher, x[theirs.to(x.device)], _rows(cond, theirs), t_next[~coin],
                                                path, schedule, generator)
            calls["teacher"] += used
        if k + 1 < len(grid) and rows.numel() == x.shape[0] and bool((t_next == grid[k + 1]).all()):
            visited.append((grid[k + 1], x.clone()))
    return Rollout(x, calls, by_student, visited)


class DAggerBuffer:
    """Algorithm 2's aggregated dataset ``D_DAgger``, bounded: the last ``capacity`` visited states with
    their grid index and conditioning rows (first in, first out), kept on the CPU."""

    def __init__(self, capacity: int):
        require_number(capacity, "DAgger buffer capacity", integer=True, at_least=1)
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self.x: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.cond: dict[str, torch.Tensor] = {}
        self.size, self.next = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, x: torch.Tensor, index: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Append states ``x`` [n, ...] at grid ``index`` [n] with conditioning rows ``cond`` (each [n, ...])."""
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.index = torch.zeros(self.capacity, dtype=torch.long)
            self.cond = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in cond.items()}
        for j in range(x.shape[0]):
            self.x[self.next] = x[j].detach().cpu()
            self.index[self.next] = int(index[j])
            for k, v in cond.items():
                self.cond[k][self.next] = v[j].detach().cpu()
            self.next = (self.next + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def draw(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``n`` states drawn uniformly with replacement: ``(x [n, ...], index [n], cond rows)`` on ``device``."""
        if not self.size:
            raise ValueError("the DAgger buffer is empty")
        pick = torch.randint(0, self.size, (n,), generator=generator)
        return (self.x[pick].to(device), self.index[pick].clone(),
                {k: v[pick].to(device) for k, v in self.cond.items()})

    def state_dict(self) -> dict:
        if not self.size:
            return {"size": 0}
        return {"x": self.x[:self.size].clone(), "index": self.index[:self.size].clone(),
                "cond": {k: v[:self.size].clone() for k, v in self.cond.items()}, "size": self.size, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        size = int(state["size"])
        if not size:
            return
        if size > self.capacity:
            raise ValueError(f"the saved DAgger buffer holds {size} states, more than this run's {self.capacity}")
        self.add(state["x"], state["index"], state["cond"])
        self.next = int(state["next"])


@dataclass
class DDILInputs:
    """What :meth:`DDILSampler.inputs` gives a method: the noisy latents with their grid indices and
    conditioning rows (both the method's own, except for states drawn from the DAgger buffer)."""

    x: torch.Tensor  # [B, C, h, w]
    index: torch.Tensor  # [B] into the method's grid (CPU)
    cond: dict[str, torch.Tensor]
    source: str
    log: dict[str, torch.Tensor]


class DDILSampler:
    """Algorithm 1's choice of a method's training inputs (module docstring).

    Args:
        spec: the priors and options.
        schedule: the teacher's noise schedule.
    """

    def __init__(self, spec: DDILSpec, schedule: NoiseSchedule):
        self.spec, self.schedule = spec, schedule
        self.buffer = DAggerBuffer(spec.buffer) if spec.buffer else None
        self.last_log: dict[str, torch.Tensor] = {}

    @property
    def stateful(self) -> bool:
        """Whether it keeps state in checkpoints (its DAgger buffer)."""
        return self.buffer is not None

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()} if self.buffer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])

    def reset(self) -> None:
        """Forget the visited states (a new halving round samples on another grid)."""
        if self.buffer is not None:
            self.buffer.clear()

    def idle(self) -> dict[str, torch.Tensor]:
        """The log of a mini-batch that drew nothing (a method that needs no DDIL input this time)."""
        self.last_log = {f"ddil/{s}": torch.tensor(0.0) for s in SOURCES}
        self.last_log |= {f"ddil/{who}_unet_calls": torch.tensor(0.0) for who in ("student", "teacher")}
        if self.spec.phase2:
            self.last_log["ddil/replayed"] = torch.tensor(0.0)
        return dict(self.last_log)

    def source(self, generator: torch.Generator, step: int) -> str:
        """Algorithm 1's draw of this mini-batch's source: ``p ~ U[0, 1]`` against the cumulative priors
        (no draw when one source has all the mass)."""
        priors = self.spec.priors(step)
        live = [s for s, p in zip(SOURCES, priors) if p > 0]
        if len(live) == 1:
            return live[0]
        p, edge = float(torch.rand((), generator=generator)), 0.0
        for name, prior in zip(SOURCES, priors):
            edge += prior
            if p < edge:
                return name
        return live[-1]  # p within rounding of 1

    def inputs(self, *, latents: torch.Tensor | Callable[[], torch.Tensor], noise: torch.Tensor, grid: list[int],
               index: torch.Tensor, cond: dict[str, torch.Tensor], teacher: Denoiser, student: Denoiser,
               generator: torch.Generator, step: int, replay: bool = True) -> DDILInputs:
        """The mini-batch's noisy latents at ``grid[index]``.

        Args:
            latents (Tensor[B, C, h, w] or a callable making it): the data, used by the forward source only.
            noise (Tensor[B, C, h, w]): forward diffusion's ε and the rollouts' pure noise.
            grid: the method's training timesteps; ``index`` [B] picks each sample's.
            cond: conditioning rows (each [B, ...]) the denoisers take; kept with buffered states.
            teacher, student: the two models (the teacher's grid may be replaced by ``teacher_steps``).
            step: the training step the priors' ramp and the phases count.
            replay: draw the second phase's replayed share (False: this call makes the rest of such a batch).
        """
        replayed = self._replay_count(noise.shape[0], step) if replay else 0
        if replayed:  # the second phase: part of the batch drawn again from the buffer, the rest as below
            x, old_index, old_cond = self.buffer.draw(replayed, generator, noise.device)  # before the rest adds more
            rest = torch.arange(replayed, noise.shape[0])
            fresh = self.inputs(latents=(lambda: (latents() if callable(latents) else latents)[rest.to(noise.device)]),
                                noise=noise[rest.to(noise.device)], grid=grid, index=index.cpu()[rest],
                                cond=_rows(cond, rest), teacher=teacher, student=student, generator=generator,
                                step=step, replay=False)
            self.last_log["ddil/replayed"] = torch.tensor(replayed / noise.shape[0])
            return DDILInputs(torch.cat([x, fresh.x]), torch.cat([old_index, fresh.index]),
                              {k: torch.cat([old_cond[k], v]) for k, v in fresh.cond.items()}, fresh.source,
                              dict(self.last_log))
        source = self.source(generator, step)
        targets = torch.tensor(grid, dtype=torch.long)[index.cpu()]
        calls = {"student": 0, "teacher": 0}
        if self.spec.teacher_steps is not None:
            teacher = Denoiser(teacher.x0, trailing_timesteps(self.spec.teacher_steps, self.schedule.num_train_timesteps),
                               teacher.calls, teacher.stochastic)
        if source == "frwd":
            data = latents() if callable(latents) else latents
            x = self.schedule.add_noise(data, noise, targets)
        elif source == "teacher":
            x, calls["teacher"] = roll(teacher, noise, cond, targets, teacher.timesteps, self.schedule, generator)
        else:
            x, index, cond = self._student_states(noise, grid, index, targets, cond, teacher, student, generator, calls)
        self.last_log = {f"ddil/{s}": torch.tensor(float(s == source)) for s in SOURCES}
        self.last_log |= {f"ddil/{who}_unet_calls": torch.tensor(float(n)) for who, n in calls.items()}
        if self.buffer is not None:
            self.last_log["ddil/buffer"] = torch.tensor(float(len(self.buffer)))
        if self.spec.phase2:
            self.last_log["ddil/replayed"] = torch.tensor(0.0)
        return DDILInputs(x, index.cpu(), cond, source, dict(self.last_log))

    def _replay_count(self, batch: int, step: int) -> int:
        """How many of a second-phase batch come from the buffer (none before the second phase, or while the buffer
        is empty: the first batches then fill it)."""
        if not (self.spec.in_phase2(step) and self.spec.replay and self.buffer is not None and len(self.buffer)):
            return 0
        return min(batch - 1, round(batch * self.spec.replay)) if batch > 1 else 0

    def _student_states(self, noise, grid, index, targets, cond, teacher, student, generator, calls):
        """The student source: its (mixed) rollout to the targets, or, with a buffer, the whole rollout's
        visited states added to the buffer and the batch drawn from it (Algorithm 3)."""
        beta = self.spec.mixed
        if self.buffer is None or len(student.timesteps) < 2:  # a 1-step student visits no state to keep
            out = mixed_roll(student, teacher, beta, noise, cond, targets, self.schedule, generator)
            _add(calls, out.calls)
            return out.x, index, cond
        ends = torch.full_like(targets, student.timesteps[-1])
        out = mixed_roll(student, teacher, beta, noise, cond, ends, self.schedule, generator)
        _add(calls, out.calls)
        for t, states in out.visited:
            if t in grid:
                self.buffer.add(states, torch.full((states.shape[0],), grid.index(t)), cond)
        if not len(self.buffer):
            raise ValueError(f"no state of the student's grid {student.timesteps} lies on the method's grid")
        x, index, cond = self.buffer.draw(noise.shape[0], generator, noise.device)
        return x, index, cond


def _add(total: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        total[k] += v
