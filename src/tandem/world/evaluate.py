"""Judge images against their captions with the exact checker and summarise: the share of
captions satisfied, overall, by number of objects and by attribute."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from .checker import CheckResult, check_batch
from .scene import relation_holds
from .stream import images_to_tensor, sample_batch, tensor_to_images

ATTRIBUTES = ("shape", "color", "size", "position", "relation")


def attribute_hits(result: CheckResult) -> dict[str, list[bool]]:
    """For each stated attribute of the caption: was it drawn (on the object's matched blob)?"""
    hits: dict[str, list[bool]] = defaultdict(list)
    for spec, b in zip(result.caption.objects, result.assignment):
        blob = result.blobs[b] if b is not None else None
        hits["shape"].append(blob is not None and blob.shape == spec.shape)
        for name in ("color", "size", "position"):
            wanted = getattr(spec, name)
            if wanted is not None:
                hits[name].append(blob is not None and getattr(blob, name) == wanted)
    if result.caption.relation is not None:
        a, b = result.assignment[:2]
        hits["relation"].append(
            a is not None and b is not None
            and relation_holds(result.caption.relation, result.blobs[a].center, result.blobs[b].center)
        )
    return hits


def summarize(results: Sequence[CheckResult]) -> dict:
    """Accuracy (share satisfied), mean soft score, and breakdowns by object count and attribute."""
    if not results:
        raise ValueError("no results to summarize")
    by_count: dict[int, list[bool]] = defaultdict(list)
    by_attr: dict[str, list[bool]] = defaultdict(list)
    count_right = []
    for r in results:
        by_count[len(r.caption.objects)].append(r.satisfied)
        for name, h in attribute_hits(r).items():
            by_attr[name].extend(h)
        count_right.append(len(r.blobs) == len(r.caption.objects))
    return {
        "n": len(results),
        "accuracy": float(np.mean([r.satisfied for r in results])),
        "mean_score": float(np.mean([r.score for r in results])),
        "by_objects": {str(k): {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_count.items())},
        "by_attribute": {k: {"n": len(by_attr[k]), "accuracy": float(np.mean(by_attr[k]))}
                         for k in ATTRIBUTES if by_attr[k]},
        "object_count_right": float(np.mean(count_right)),
    }


def judge(images: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict:
    return summarize(check_batch(images, prompts))


@torch.no_grad()
def vae_reconstructions(vae, n: int = 1000, seed: int = 12345, batch_size: int = 250) -> dict:
    """Encode and decode ``n`` held-out renderings (a stream seed no training run uses) and judge
    each reconstruction against its scene's caption."""
    captions, images = sample_batch(seed, 0, n)
    recons = []
    for start in range(0, n, batch_size):
        x = images_to_tensor(images[start:start + batch_size])
        z = vae.encode(x).latent_dist.mean
        recons.append(tensor_to_images(vae.decode(z).sample))
    recon = np.concatenate(recons)
    summary = judge(recon, captions)
    summary["mean_abs_error"] = float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean())
    return summary
