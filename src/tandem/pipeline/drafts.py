"""Oracle-chosen drafts (best of N): the student draws ``N`` drafts of each prompt from different noise, the
oracle scores them all, and the best-scoring draft is the prompt's student image, routed to the teacher as
usual. The calibration is then of the best-of-N scores (``pipe.calibrate(prompts, drafts=N)``), so that tau
at percentile k keeps its meaning: k% of the prompts go to the teacher.

A call of ``n`` prompts with ``N`` drafts runs the stages over ``n * N`` draft slots, prompt-major: slot
``i * N + d`` is draft ``d`` of prompt ``i``. Draft 0 of prompt ``i`` has the generator a one-draft call gives
image ``i`` (from ``(seed, i)``), so it is the image a one-draft call draws; draft ``d > 0`` has its own, from
``(seed, i, d)``. The kept draft's generator goes on to draw the teacher's refinement noise, as for one draft.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..checks import count
from ..generate import derive_seed, prompt_generator
from .records import CostLedger


def check_drafts(drafts) -> int:
    return count(drafts, "drafts")


def draft_generator(seed: int, index: int, draft: int) -> torch.Generator:
    """Draft ``draft`` of prompt ``index``'s generator in a run seeded with ``seed`` (draft 0: the prompt's)."""
    if draft == 0:
        return prompt_generator(seed, index)
    return torch.Generator().manual_seed(derive_seed(seed, index, draft))


def draft_generators(seed: int, indices, drafts: int) -> list[torch.Generator]:
    """The generators of the draft slots of prompts ``indices`` (a count: 0 .. n-1) in a run seeded with
    ``seed``, prompt-major: what ``generator=`` takes for a call with ``drafts``."""
    indices = range(indices) if isinstance(indices, int) else indices
    return [draft_generator(seed, i, d) for i in indices for d in range(drafts)]


def expand(values: list, drafts: int) -> list:
    """Each of ``values`` (one per prompt) repeated for its drafts: one per slot."""
    return [v for v in values for _ in range(drafts)]


def best_drafts(scores: np.ndarray, drafts: int) -> list[int]:
    """The slot kept for each prompt: its best-scoring draft (the earliest among equal scores)."""
    per_prompt = np.asarray(scores, dtype=np.float64).reshape(-1, drafts)
    return [i * drafts + int(np.argmax(row)) for i, row in enumerate(per_prompt)]


def fold_ledger(ledger: CostLedger, drafts: int) -> CostLedger:
    """The ledger of the prompts: each prompt pays for all its drafts (their UNet rows, decodes and oracle calls)."""
    n = len(ledger.per_image["oracle"]) // drafts
    folded = CostLedger(n, ledger.modules)
    for key, per_slot in ledger.per_image.items():
        folded.per_image[key] = per_slot.reshape(n, drafts).sum(axis=1)
    folded.counts = dict(ledger.counts)
    return folded


def prompts_view(run, drafts: int):
    """A :class:`~.stages.Phases` over draft slots as one over prompts: each prompt's kept draft (its latents,
    image, student image and score), the teacher's improvements by prompt; ``kept`` stays the slots."""
    kept = run.kept
    return replace(run, latents=[run.latents[j] for j in kept], images=[run.images[j] for j in kept],
                   student_images=[run.student_images[j] for j in kept], scores=run.scores[kept],
                   improved=sorted(j // drafts for j in run.improved))


def draft_record(record: dict, slot: int, drafts: int, scores: np.ndarray) -> dict:
    """``record`` (prompt ``slot // drafts``'s) with the draft kept and every draft's score."""
    record["draft"] = slot % drafts
    record["draft_scores"] = [float(s) for s in scores[slot - slot % drafts: slot - slot % drafts + drafts]]
    return record
