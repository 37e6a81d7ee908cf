"""Where students win (section 3.1 and appendix B of the adaptive teacher-student paper).

For each prompt, the student's and the teacher's images from the same initial noise, the judge's
verdict on which is better, and what might explain it: the distance between the two images in the
world CLIP's image-embedding space (``features.ImageFeatures.world``; the DreamSim of this world),
the scene's complexity (objects in the caption, edge density of the teacher's image), the prompt's
length in tokens, the curvature of the teacher's sampling trajectory, and the student's text
influence (how strongly its cross-attention dwells on the prompt's tokens).

Trajectory curvature (B.1, after Chen et al.): the largest L2 distance, over the sampler's steps,
from the teacher's denoised prediction x0_hat(t) to the straight line through the trajectory's
endpoints (the initial noise x_T and the final latent x_0), in latent space.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..generate import decode_latents, initial_latents, prompt_generator
from ..models import make_scheduler
from .metrics import win_rate


@torch.no_grad()
def teacher_with_curvature(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float,
                           batch_size: int = 100, progress: Callable[[int, int], None] | None = None):
    """The teacher's DPM-Solver++ images of ``prompts`` (prompt i from the generator of ``(seed, i)``,
    as every tandem sampler) and the curvature of each trajectory.

    Returns:
        uint8 images [N, H, W, 3], curvatures [N].
    """
    teacher = pipe.teacher
    images, curvature = [], []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        scheduler = make_scheduler("dpm", pipe._teacher_scheduler_config)
        predictions = []
        convert = scheduler.convert_model_output

        def recording(*args, convert=convert, predictions=predictions, **kwargs):
            x0 = convert(*args, **kwargs)  # DPM-Solver++ works with data predictions: this is x0_hat(t)
            predictions.append(x0.detach().float().cpu())
            return x0

        scheduler.convert_model_output = recording
        teacher.scheduler = scheduler
        noise = initial_latents(teacher, seed, idx)
        final = teacher([prompts[i] for i in idx], num_inference_steps=steps, guidance_scale=guidance_scale,
                        latents=noise.clone(), output_type="latent").images
        images += decode_latents(teacher, final)
        curvature.append(trajectory_curvature(noise.float().cpu(), final.float().cpu(), torch.stack(predictions)))
        if progress:
            progress(idx[-1] + 1, len(prompts))
    return np.stack(images), torch.cat(curvature).numpy()


def student_text_influence(pipe, prompts: list[str], seed: int, steps: int, batch_size: int = 100,
                           progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """How much the student's image follows its prompt (B.1, after DAAM): of the student's mean
    cross-attention per token (``student_cross_attention``), the largest over the prompt's own tokens
    (not BOS, EOS or padding). Returns influence [N] in [0, 1]."""
    per_token = student_cross_attention(pipe, prompts, seed, steps, batch_size, progress)
    lengths = [min(len(pipe.student.tokenizer(p).input_ids), per_token.shape[1]) for p in prompts]  # BOS..EOS
    return np.array([row[1:max(n - 1, 2)].max() for row, n in zip(per_token, lengths)])


@torch.no_grad()
def student_cross_attention(pipe, prompts: list[str], seed: int, steps: int, batch_size: int = 100,
                            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The student's cross-attention probabilities of each text token, averaged over its steps, UNet
    layers, heads and image positions: [N, tokens] (each row sums to 1). The student draws prompt i
    from the generator of ``(seed, i)``, as in the sweeps; under classifier-free guidance only the
    conditional half counts."""
    from diffusers.models.attention_processor import AttnProcessor

    class Recording(AttnProcessor):
        """diffusers' plain attention, with its attention probabilities passed to ``sink``."""

        def __init__(self, sink):
            super().__init__()
            self.sink = sink

        def __call__(self, attn, *args, **kwargs):
            scores = attn.get_attention_scores

            def recording(query, key, attention_mask=None):
                probs = scores(query, key, attention_mask)
                self.sink(probs, attn.heads)
                return probs

            attn.get_attention_scores = recording
            try:
                return super().__call__(attn, *args, **kwargs)
            finally:
                del attn.get_attention_scores

    unet = pipe.student.unet
    saved = unet.attn_processors
    rows = []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        total: list[torch.Tensor] = []

        def sink(probs: torch.Tensor, heads: int, n: int = len(idx), total=total) -> None:
            per_token = probs.unflatten(0, (-1, heads)).float().mean((1, 2))[-n:]  # [n, tokens]
            total.append(per_token)

        unet.set_attn_processor({name: Recording(sink) if name.endswith("attn2.processor") else processor
                                 for name, processor in saved.items()})
        try:
            pipe([prompts[i] for i in idx], mode="student", num_inference_steps=steps, score=False,
                 generator=[prompt_generator(seed, i) for i in idx], batch_size=len(idx))
        finally:
            unet.set_attn_processor(dict(saved))  # diffusers empties the dict it is given
        if not total:
            raise ValueError("the student's UNet has no cross-attention layers (attn2) to measure text influence by")
        rows.append(torch.stack(total).mean(0).double().numpy())
        if progress:
            progress(idx[-1] + 1, len(prompts))
    return np.concatenate(rows)


def trajectory_curvature(start: torch.Tensor, end: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Largest distance of ``points`` [T, B, ...] from the line through ``start`` and ``end`` [B, ...]; [B]."""
    a = start.flatten(1).double()
    d = end.flatten(1).double() - a
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    p = points.flatten(2).double() - a  # [T, B, D]
    along = (p * d).sum(-1, keepdim=True)
    return (p - along * d).norm(dim=-1).amax(0).float()


def edge_density(images: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Share of pixels whose grey-level gradient magnitude (Sobel, intensities in [0, 1]) exceeds ``threshold``."""
    grey = images.astype(np.float64).mean(-1) / 255
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")

    def window(dy: int, dx: int) -> np.ndarray:
        h, w = grey.shape[1:]
        return padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (window(-1, 1) + 2 * window(0, 1) + window(1, 1)) - (window(-1, -1) + 2 * window(0, -1) + window(1, -1))
    gy = (window(1, -1) + 2 * window(1, 0) + window(1, 1)) - (window(-1, -1) + 2 * window(-1, 0) + window(-1, 1))
    return (np.hypot(gx, gy) / 4 > threshold).mean((1, 2))


def by_bins(values: np.ndarray, student: np.ndarray, teacher: np.ndarray, bins: int | None = 5,
            extra: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Win rate of the student over the teacher (judge scores) within quantile bins of ``values``
    (``bins=None``: one group per distinct value), with the mean of each ``extra`` array per bin."""
    if bins is None:
        groups = [(v, v, values == v) for v in np.unique(values)]
    else:
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
        which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
        groups = [(edges[b], edges[b + 1], which == b) for b in range(len(edges) - 1)]
    rows = []
    for lo, hi, mask in groups:
        if not mask.any():
            continue
        row = {"low": float(lo), "high": float(hi), "n": int(mask.sum()),
               **{k: v for k, v in win_rate(student[mask], teacher[mask]).items() if k in ("win_rate", "ci", "tie")}}
        for name, arr in (extra or {}).items():
            row[f"mean_{name}"] = float(arr[mask].mean())
        rows.append(row)
    return rows
