"""What a user can do after a training fails: the advice a divergence gives can be followed (a resumed run may
lower its learning rate), a new run that failed before its first checkpoint leaves nothing that blocks the
corrected run, and a refused resume names the one setting that differs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tandem.checks import NonFiniteError, first_difference
from tandem.training.config import Trainable, TrainerConfig
from tandem.training.trainer import Trainer


class Toy:
    """One scalar weight whose loss is the weight itself (every SGD step moves it by exactly the LR); the loss
    turns NaN at ``nan_at`` (a divergence)."""

    name = "toy"
    uses_data = False

    def __init__(self, lr: float, nan_at: int | None = None):
        self.net = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.net.weight.fill_(1.0)
        self.lr, self.nan_at, self.seen = lr, nan_at, []

    def trainables(self):
        return [Trainable("net", self.net, lr=self.lr, grad_clip=None,
                          make_optimizer=lambda params: torch.optim.SGD(params, lr=self.lr))]

    def frozen(self):
        return {}

    def step(self, batch, update, ctx):
        self.seen.append(self.net.weight.item())
        loss = self.net.weight.sum()
        return {"loss": loss * float("nan") if ctx.step == self.nan_at else loss}


def _trainer(method: Toy, out, steps: int, resume: bool = False, every: int = 2) -> Trainer:
    return Trainer(method, None, TrainerConfig(max_steps=steps, checkpoint_every=every), out, resume=resume,
                   run_config={"toy": {"lr": method.lr, "width": 1}})


def test_a_diverged_run_resumes_from_its_checkpoint_with_the_lower_lr_it_was_advised(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"at step 3; resume from its last checkpoint \(step 2\) with resume=True "
                                             r"and a lower lr$"):
        _trainer(Toy(0.1, nan_at=3), out, 6).train()
    lower = Toy(0.025)
    _trainer(lower, out, 6, resume=True).train()
    moves = [a - b for a, b in zip(lower.seen, lower.seen[1:])]
    assert lower.seen[0] == pytest.approx(1.0 - 2 * 0.1)  # the checkpoint's weights: two steps at the old LR
    assert moves == pytest.approx([0.025] * 3)  # then the new one
    assert json.loads((out / "train_config.json").read_text())["toy"]["lr"] == 0.025


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="wrote no checkpoint yet, so nothing of it is kept: start it again"):
        _trainer(Toy(0.1, nan_at=1), out, 6, every=4).train()
    assert list(out.iterdir()) == []
    _trainer(Toy(0.05), out, 2).train()  # the corrected run, in the same --out, without --resume


def test_a_refused_resume_names_the_setting_that_differs(tmp_path):
    out = tmp_path / "run"
    _trainer(Toy(0.1), out, 2).train()
    with pytest.raises(ValueError, match=r"\(toy\.width: saved 1, requested 2\); a resumed run may change only "):
        Trainer(Toy(0.1), None, TrainerConfig(max_steps=4), out, resume=True, run_config={"toy": {"lr": 0.1, "width": 2}})


def test_first_difference_names_the_path_of_the_first_differing_value():
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == "a.b.1: saved 2, requested 3"
    assert first_difference({"a": 1}, {"a": 1, "c": 2}) == "c (requested only)"
    assert first_difference({"a": [1]}, {"a": [1, 2]}) == "a: saved [1], requested [1, 2]"
    assert first_difference({"a": 1}, {"a": 1}) is None
