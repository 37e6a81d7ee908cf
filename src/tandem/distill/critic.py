"""DMD2's critic ("guidance" network): the fake score, a trainable copy of the teacher's UNet, and the
optional GAN classifier on its bottleneck (:mod:`tandem.distill.dmd2`)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

# -- the critic: fake score and GAN classifier --------------------------------------------------------------

def bottleneck_features(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The mid-block output of a ``UNet2DConditionModel`` at ``(x_t, t, c)``: the encoder half of its
    ``forward`` (time embedding, ``conv_in``, down blocks, mid block), without computing the decoder.

    Args:
        x (Tensor[B, C, h, w]), t (Tensor[B]), cond (Tensor[B, L, D]).
    Returns:
        Tensor[B, C_mid, h', w'].
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=cond)
    return unet.mid_block(h, emb)


def check_bottleneck_unet(config) -> None:
    """Refuse UNets whose conditioning :func:`bottleneck_features` does not reproduce."""
    unsupported = {k: config.get(k) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type",
                                              "time_cond_proj_dim") if config.get(k) is not None}
    if config.get("center_input_sample"):
        unsupported["center_input_sample"] = True
    if config.get("mid_block_type") is None:
        unsupported["mid_block_type"] = None
    if unsupported:
        raise ValueError(f"the GAN classifier reads the teacher UNet's mid block, but this UNet has "
                         f"{unsupported}; train without it (gan_weight 0)")


class Critic(nn.Module):
    """DMD2's "guidance" network: the fake score (a trainable copy of the teacher's UNet) and, with a
    GAN, a classifier head on its bottleneck. DMD2's head downsamples its 8×8 / 32×32 bottlenecks with
    strided 4×4 convolutions; this one pools, to fit any latent size: conv 3×3, GroupNorm, SiLU, mean
    over space, linear to one logit."""

    def __init__(self, teacher_unet, gan: bool, seed: int = 0):
        super().__init__()
        self.unet = copy.deepcopy(teacher_unet).float().requires_grad_(True).train()
        self.head = None
        if gan:
            config = teacher_unet.config
            check_bottleneck_unet(config)
            channels = config.block_out_channels[-1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                          nn.GroupNorm(config.norm_num_groups, channels), nn.SiLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))

    def logits(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The classifier's logits [B] ("real" is positive)."""
        return self.head(bottleneck_features(self.unet, x, t, cond)).squeeze(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                gan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """``(the fake score's prediction at (x, t, cond), logits of gan = (x, t, cond) or None)``: one call, so
        that a distributed critic sees one forward per backward."""
        pred = self.unet(x, t, encoder_hidden_states=cond).sample
        return pred, (self.logits(*gan) if gan is not None else None)


@contextmanager
def parameters_frozen(module: nn.Module):
    """Run a forward through ``module`` without recording gradients for its parameters (its inputs still
    get theirs): a generator loss through the critic leaves the critic's gradients untouched."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
