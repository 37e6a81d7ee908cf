"""The shared Trainer with several networks and a method that keeps state of its own.

A generator and a critic train against each other (the shape of ADD and DMD2): the generator's
loss backpropagates through the critic, and the critic's update must still be the plain gradient
step of the critic's own loss, computed here by hand with autograd. A method's own state (a replay
buffer, a counter) is checkpointed and restored, and a resumed run ends bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tandem.training.config import Trainable, TrainerConfig
from tandem.training.trainer import Trainer

LR = 0.1


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


class Adversarial:
    """A toy generator/critic pair: the generator wants the critic's score of its samples high; the
    critic wants its score of real data (1.0) high and of generated samples low."""

    name = "toy-adversarial"
    uses_data = False

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.generator = nn.Linear(2, 2)
        self.critic = nn.Linear(2, 1)

    def trainables(self):
        return [Trainable("generator", self.generator, make_optimizer=sgd, grad_clip=None),
                Trainable("critic", self.critic, make_optimizer=sgd, grad_clip=None)]

    def frozen(self):
        return {}

    def step(self, batch, update, ctx):
        z = torch.randn(4, 2, generator=ctx.generator)
        fake = ctx.model("generator")(z)
        if update == "generator":
            return {"loss": -ctx.model("critic")(fake).mean()}
        return {"loss": self.critic_loss(ctx.model("critic"), fake.detach())}

    @staticmethod
    def critic_loss(critic, fake):
        return critic(fake).mean() - critic(torch.ones(1, 2)).mean()


def test_a_critics_update_is_the_gradient_of_its_own_loss_alone(tmp_path):
    method = Adversarial()
    trainer = Trainer(method, None, TrainerConfig(max_steps=1, checkpoint_every=1), tmp_path / "run")
    critic_before = copy.deepcopy(method.critic)
    generator_before = copy.deepcopy(method.generator)
    trainer.train_step(0)  # generator first (its loss runs through the critic), then the critic
    # the critic's expected step: its own loss on the samples of the *updated* generator, same noise
    gen = torch.Generator().manual_seed(_seed_of(trainer, 0, "critic"))
    fake = method.generator(torch.randn(4, 2, generator=gen)).detach()
    loss = Adversarial.critic_loss(critic_before, fake)
    grads = torch.autograd.grad(loss, list(critic_before.parameters()))
    for after, before, g in zip(method.critic.parameters(), critic_before.parameters(), grads):
        torch.testing.assert_close(after.detach(), before.detach() - LR * g, rtol=0, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(method.generator.parameters(), generator_before.parameters()))
    assert all(p.grad is None for p in [*method.critic.parameters(), *method.generator.parameters()])


def _seed_of(trainer: Trainer, step: int, name: str) -> int:
    from tandem.generate import derive_seed
    from tandem.training.trainer import _name_key

    return derive_seed(trainer.cfg.seed, step, _name_key(name))


class Buffered(Adversarial):
    """Adversarial with state of its own: a replay buffer of generated samples the critic also sees,
    and a counter of critic updates."""

    name = "toy-buffered"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.buffer = torch.zeros(0, 2)
        self.critic_updates = 0

    def step(self, batch, update, ctx):
        losses = super().step(batch, update, ctx)
        if update == "critic":
            with torch.no_grad():
                z = torch.randn(2, 2, generator=ctx.generator)
                self.buffer = torch.cat([self.buffer, ctx.model("generator")(z)])[-6:]
            losses["loss"] = losses["loss"] + ctx.model("critic")(self.buffer).mean()
            self.critic_updates += 1
        return losses

    def state_dict(self):
        return {"buffer": self.buffer.clone(), "critic_updates": self.critic_updates}

    def load_state_dict(self, state):
        self.buffer, self.critic_updates = state["buffer"].clone(), int(state["critic_updates"])


def test_a_methods_own_state_resumes_bitwise(tmp_path):
    whole = Buffered()
    Trainer(whole, None, TrainerConfig(max_steps=6, checkpoint_every=3), tmp_path / "whole").train()

    first = Buffered()
    Trainer(first, None, TrainerConfig(max_steps=3, checkpoint_every=3), tmp_path / "split").train()
    resumed = Buffered(seed=1)  # other weights and an empty buffer: everything must come from the checkpoint
    Trainer(resumed, None, TrainerConfig(max_steps=6, checkpoint_every=3), tmp_path / "split", resume=True).train()

    assert resumed.critic_updates == whole.critic_updates == 6
    assert torch.equal(resumed.buffer, whole.buffer)
    for a, b in zip([*resumed.generator.parameters(), *resumed.critic.parameters()],
                    [*whole.generator.parameters(), *whole.critic.parameters()]):
        assert torch.equal(a, b)


def test_a_checkpoint_without_the_methods_state_is_refused(tmp_path):
    import pytest

    class SameNameBuffered(Buffered):
        name = Adversarial.name  # the same run configuration, but a method that now keeps state

    Trainer(Adversarial(), None, TrainerConfig(max_steps=2, checkpoint_every=2), tmp_path / "run").train()
    with pytest.raises(ValueError, match="holds no 'method'"):
        Trainer(SameNameBuffered(), None, TrainerConfig(max_steps=4, checkpoint_every=2), tmp_path / "run",
                resume=True)


def test_the_student_sampler_lets_gradients_through(tiny_world):
    """A training step may backpropagate through the student's own sampling (ADD, DMD2): the library
    sampler builds a graph, and a loss on its output reaches the student's weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from tandem.distill.consistency import make_student_unet
    from tandem.sampling import consistency_sample

    torch.manual_seed(0)
    unet = make_student_unet(UNet2DConditionModel.from_pretrained(tiny_world / "unet"), 32)
    alphas = DDPMScheduler.from_pretrained(tiny_world / "scheduler").alphas_cumprod
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x0 = consistency_sample(unet, alphas, latents, text, gens, steps=2)
    assert x0.requires_grad
    x0.square().mean().backward()
    assert all(p.grad is not None for p in unet.conv_out.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in unet.conv_out.parameters())
