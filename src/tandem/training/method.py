"""What a training method and the Trainer (:mod:`tandem.training.trainer`) say to each other: the
:class:`Method` a method implements, the :class:`StepContext` its ``step`` sees, and the :class:`EMACopy`
of a network the Trainer keeps for it."""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import nn

from .checks import require_decay
from .config import Trainable


class Method(Protocol):
    """What a training method declares."""

    name: str
    uses_data: bool  # False for data-free methods: the Trainer then never reads a batch

    def trainables(self) -> list[Trainable]: ...

    def frozen(self) -> dict[str, nn.Module]:
        """Networks the method uses but never trains (e.g. the teacher); moved to the device, eval mode,
        without gradients."""
        ...

    def step(self, batch: Any, update: str, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Losses for updating the trainable ``update``; the Trainer backpropagates ``losses["loss"]``.
        Only ``update``'s optimizer steps on it: gradients the loss leaves on other trainables (a generator
        loss backpropagated through a critic) are discarded, never added to their next update."""
        ...

    # Optional: a method with state of its own (a replay buffer, a stage, counters) defines
    # ``state_dict() -> dict`` (tensors and plain data) and ``load_state_dict(state)``; the Trainer keeps
    # it in every checkpoint and restores it on resume. ``state_dict()`` returning None means no state in this
    # run (an option that keeps state is off), and its checkpoints hold none.


class EMACopy:
    """An exponential moving average of a module, kept as a module (so a method can run it)."""

    def __init__(self, module: nn.Module, decay: float, device: torch.device | str = "cpu"):
        require_decay(decay, "EMA decay")
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        for mine, theirs in zip(self.module.state_dict().values(), source.state_dict().values()):
            if mine.dtype.is_floating_point:
                mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - self.decay)
            else:
                mine.copy_(theirs)


class StepContext:
    """What ``Method.step`` sees: the prepared networks, EMAs, a per-step generator, the accelerator.

    ``prepared``, ``emas`` and ``frozen`` are the Trainer's own dicts (the trainables as prepared for the run, their
    EMA copies by network and name, the frozen networks); the Trainer sets ``step``, ``micro``, ``batch_index`` and
    ``generator`` before each call of ``Method.step``."""

    def __init__(self, accelerator, prepared: dict[str, nn.Module], emas: dict[str, dict[str, EMACopy]],
                 frozen: dict[str, nn.Module]):
        self.accelerator = accelerator
        self._prepared, self._emas, self._frozen = prepared, emas, frozen
        self.step = 0
        self.micro = 0
        self.batch_index = 0
        self.generator = torch.Generator()  # a CPU generator; methods move their draws to ctx.device

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def model(self, name: str) -> nn.Module:
        """The trainable ``name`` as prepared for this run (DDP-wrapped when distributed): call it for forwards."""
        return self._prepared[name]

    def unwrapped(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self._prepared[name])

    def ema(self, name: str, ema_name: str) -> nn.Module:
        return self._emas[name][ema_name].module

    def frozen(self, name: str) -> nn.Module:
        return self._frozen[name]
