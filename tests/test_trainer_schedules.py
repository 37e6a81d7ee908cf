"""The Trainer's learning-rate schedules, parameter groups and run directories that keep a data cache.

A toy network whose loss is its own weight (gradient 1) moves by exactly the learning rate of each
plain SGD step, so the LR the Trainer used at every step can be read off the weights' trajectory and
checked against the schedule's closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tandem.training.config import Trainable, TrainerConfig
from tandem.training.schedules import LRStage, lr_factor, parse_lr_stages, staged_lr_factor
from tandem.training.trainer import Trainer


def test_the_cosine_schedule_against_its_closed_form():
    """Warm-up 2 of 10 steps: linear to the peak, then (1 + cos(pi p)) / 2 over the remaining 8, 0 from the end on."""
    factors = [lr_factor(step, 2, 10, "cosine") for step in range(12)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0  # p = 0
    assert factors[6] == pytest.approx(0.5, abs=1e-15)  # p = 1/2
    assert factors[4] == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-15)  # p = 1/4
    assert factors[10] == factors[11] == 0.0  # p = 1, clipped after max_steps
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_the_constant_schedule_is_the_trainers_warm_up_as_before():
    """The default schedule, which every distillation method uses, gives the bits the Trainer's warm-up always gave."""
    for warmup in range(0, 6):
        for step in range(12):
            before = min(1.0, (step + 1) / warmup) if warmup else 1.0
            assert lr_factor(step, warmup, 8) == before
    with pytest.raises(ValueError, match="lr_schedule"):
        Trainable("net", nn.Linear(1, 1), lr_schedule="linear")


class _Stop(Exception):
    pass


class Slope:
    """Two scalar weights whose loss is their sum: every SGD step moves each by its group's learning rate.
    Records the weights it saw at every step; stops (like a killed run) at step ``stop_at``."""

    name = "toy-slope"
    uses_data = False

    def __init__(self, lr: float = 0.1, tower_scale: float = 0.25, schedule: str = "cosine", warmup: int = 2,
                 stop_at: int | None = None, optimizer=torch.optim.SGD):
        self.net = nn.ModuleDict({"head": nn.Linear(1, 1, bias=False), "tower": nn.Linear(1, 1, bias=False)})
        with torch.no_grad():
            for p in self.net.parameters():
                p.fill_(1.0)
        self.lr, self.tower_scale, self.schedule, self.warmup = lr, tower_scale, schedule, warmup
        self.stop_at, self.optimizer, self.seen = stop_at, optimizer, []

    def make_optimizer(self, params):
        # groups in another order than the network's parameters, each at its own peak LR
        return self.optimizer([{"params": self.net["tower"].parameters(), "lr": self.lr * self.tower_scale},
                               {"params": self.net["head"].parameters(), "lr": self.lr}])

    def trainables(self):
        return [Trainable("net", self.net, lr=self.lr, warmup_steps=self.warmup, lr_schedule=self.schedule,
                          grad_clip=None, make_optimizer=self.make_optimizer)]

    def frozen(self):
        return {}

    def step(self, batch, update, ctx):
        if ctx.step == self.stop_at:
            raise _Stop
        self.seen.append((self.net["head"].weight.item(), self.net["tower"].weight.item()))
        return {"loss": self.net["head"].weight.sum() + self.net["tower"].weight.sum()}


def _moves(seen: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(a[0] - b[0], a[1] - b[1]) for a, b in zip(seen, seen[1:])]


def test_the_trainer_follows_the_schedule_in_every_parameter_group(tmp_path):
    method = Slope()
    Trainer(method, None, TrainerConfig(max_steps=7, checkpoint_every=7), tmp_path / "run").train()
    for step, (head, tower) in enumerate(_moves(method.seen)):
        expected = 0.1 * lr_factor(step, 2, 7, "cosine")
        assert head == pytest.approx(expected, abs=1e-7), step
        assert tower == pytest.approx(expected * 0.25, abs=1e-7), step
    assert _moves(method.seen)[0][0] == pytest.approx(0.05, abs=1e-7)  # half the peak: the first warm-up step


def test_a_resumed_run_with_more_steps_decays_to_its_new_end(tmp_path):
    Trainer(Slope(), None, TrainerConfig(max_steps=4, checkpoint_every=2), tmp_path / "run").train()
    longer = Slope()
    Trainer(longer, None, TrainerConfig(max_steps=8, checkpoint_every=2), tmp_path / "run", resume=True).train()
    for step, (head, _) in enumerate(_moves(longer.seen), start=4):
        assert head == pytest.approx(0.1 * lr_factor(step, 2, 8, "cosine"), abs=1e-7), step


def test_an_interrupted_run_with_groups_and_a_cosine_schedule_resumes_bitwise(tmp_path):
    whole = Slope(optimizer=torch.optim.AdamW)
    Trainer(whole, None, TrainerConfig(max_steps=6, checkpoint_every=2), tmp_path / "whole").train()
    killed = Slope(optimizer=torch.optim.AdamW, stop_at=3)
    with pytest.raises(_Stop):
        Trainer(killed, None, TrainerConfig(max_steps=6, checkpoint_every=2), tmp_path / "split").train()
    resumed = Slope(optimizer=torch.optim.AdamW)
    trainer = Trainer(resumed, None, TrainerConfig(max_steps=6, checkpoint_every=2), tmp_path / "split", resume=True)
    assert trainer.start_step == 2
    trainer.train()
    assert resumed.seen == whole.seen[2:]
    for a, b in zip(resumed.net.parameters(), whole.net.parameters()):
        assert torch.equal(a, b)


def test_a_trainable_may_have_a_learning_rate_of_zero(tmp_path):
    method = Slope(lr=0.0)
    Trainer(method, None, TrainerConfig(max_steps=2), tmp_path / "run").train()
    assert method.seen[0] == method.seen[1] == (1.0, 1.0)
    with pytest.raises(ValueError, match="lr"):
        Trainable("net", nn.Linear(1, 1), lr=-1e-3)


def test_a_new_run_may_start_in_a_directory_holding_only_what_it_keeps(tmp_path):
    cache = tmp_path / "run" / "data" / "part.npz"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"cached samples")
    with pytest.raises(FileExistsError, match="not empty"):
        Trainer(Slope(), None, TrainerConfig(max_steps=1), tmp_path / "run")
    Trainer(Slope(), None, TrainerConfig(max_steps=1), tmp_path / "run", keep=("data",)).train()
    assert cache.read_bytes() == b"cached samples" and (tmp_path / "run" / "checkpoint" / "state.pt").is_file()
    (tmp_path / "other" / "data").mkdir(parents=True)
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match="notes.txt"):
        Trainer(Slope(), None, TrainerConfig(max_steps=1), tmp_path / "other", keep=("data",))


# -- staged schedules (a training in several stages, as the world's teacher was trained) ----------------------


def test_a_staged_schedule_against_its_closed_form():
    """Two stages written out by hand: 4 steps constant at 1 with a 2-step warm-up, then 5 steps of cosine from 0.5
    after a 1-step warm-up; past the end the last stage's end value (0) holds."""
    stages = parse_lr_stages("4:constant:1:2, 5:cosine:0.5:1")
    assert stages == (LRStage(4, "constant", 1.0, 2), LRStage(5, "cosine", 0.5, 1))
    factors = [staged_lr_factor(step, stages) for step in range(11)]
    by_hand = [0.5, 1.0, 1.0, 1.0,  # stage 1
               0.5,  # stage 2's warm-up: 0.5 * 1/1
               0.5, 0.5 * (1 + math.cos(math.pi / 4)) / 2, 0.25, 0.5 * (1 + math.cos(3 * math.pi / 4)) / 2,
               0.0, 0.0]
    assert factors == pytest.approx(by_hand, abs=1e-15)
    assert parse_lr_stages("3") == (LRStage(3),)


@pytest.mark.parametrize("text, needle", [
    ("", "stage 1"), ("5:cosine:1:5", "warm-up"), ("5:linear", "shape"), ("x", "integers"),
    ("5:cosine:0", "peak"), ("5,0", "stage 2"), ("5:cosine:1:1:9", "STEPS"),
])
def test_a_bad_staged_schedule_is_refused_naming_the_stage(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_lr_stages(text)


class StagedSlope(Slope):
    def __init__(self, stages, **kwargs):
        super().__init__(**kwargs)
        self.stages = stages

    def trainables(self):
        return [Trainable("net", self.net, lr=self.lr, grad_clip=None, make_optimizer=self.make_optimizer,
                          lr_stages=self.stages)]


def test_the_trainer_follows_a_staged_schedule_and_resumes_it_bitwise(tmp_path):
    stages = parse_lr_stages("3:constant:1:1,4:cosine:0.4:1")
    method = StagedSlope(stages)
    Trainer(method, None, TrainerConfig(max_steps=7, checkpoint_every=7), tmp_path / "run").train()
    for step, (head, tower) in enumerate(_moves(method.seen)):
        assert head == pytest.approx(0.1 * staged_lr_factor(step, stages), abs=1e-7), step
        assert tower == pytest.approx(0.025 * staged_lr_factor(step, stages), abs=1e-7), step

    whole = StagedSlope(stages, optimizer=torch.optim.AdamW)
    Trainer(whole, None, TrainerConfig(max_steps=7, checkpoint_every=2), tmp_path / "whole").train()
    killed = StagedSlope(stages, optimizer=torch.optim.AdamW, stop_at=5)
    with pytest.raises(_Stop):
        Trainer(killed, None, TrainerConfig(max_steps=7, checkpoint_every=2), tmp_path / "split").train()
    resumed = StagedSlope(stages, optimizer=torch.optim.AdamW)
    Trainer(resumed, None, TrainerConfig(max_steps=7, checkpoint_every=2), tmp_path / "split", resume=True).train()
    assert resumed.seen == whole.seen[4:]


def test_a_staged_schedule_must_fill_the_run_and_carry_its_own_warm_ups(tmp_path):
    with pytest.raises(ValueError, match="add up to 7 steps, not the run's max_steps 8"):
        Trainer(StagedSlope(parse_lr_stages("3,4")), None, TrainerConfig(max_steps=8), tmp_path / "run")
    with pytest.raises(ValueError, match="own warm-ups"):
        Trainable("net", nn.Linear(1, 1), warmup_steps=5, lr_stages=parse_lr_stages("3"))
