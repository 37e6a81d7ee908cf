"""Metrics over per-image judge scores: side-by-side win rates and the oracle's decision accuracy
(section 3.2 and Fig. 7 of the adaptive teacher-student paper, and its appendix D.4)."""

from __future__ import annotations

import numpy as np


def _win_points(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt: 1 where A's score beats B's, 1/2 on a tie, 0 where it loses."""
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"win rate needs two equally long, non-empty score vectors, got {a.shape} and {b.shape}")
    return (a > b) + 0.5 * (a == b)


def paired_win_rate(a: np.ndarray, b: np.ndarray) -> dict:
    """:func:`win_rate`'s rate without the bootstrap, with its standard error over the prompts (cheap enough to
    give every point of a curve)."""
    points = _win_points(np.asarray(a, float), np.asarray(b, float))
    return {"rate": float(points.mean()), "se": float(points.std() / np.sqrt(len(points)))}


def win_rate(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Side by side: how often method A's image beats method B's on the same prompt and seed.

    Args:
        a, b: per-prompt judge scores [N] of the two methods (higher is better).
    Returns:
        win, tie and loss shares, ``win_rate`` (ties split) and its bootstrap confidence interval
        (prompts resampled with replacement ``resamples`` times, percentile interval at ``level``).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    points = _win_points(a, b)
    idx = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    boot = points[idx].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"n": len(a), "win": float((a > b).mean()), "tie": float((a == b).mean()), "loss": float((a < b).mean()),
            "win_rate": float(points.mean()), "ci": [float(lo), float(hi)], "ci_level": level}


def decision_accuracy(student_oracle: np.ndarray, teacher_oracle: np.ndarray, student_judge: np.ndarray,
                      teacher_judge: np.ndarray, taus: dict[float, float]) -> dict:
    """How often the oracle's decision "the student's image is the better one" agrees with the judge.

    Only prompts where the judge prefers one image count. *Full reference*: the oracle compares the
    two images' scores (needs the teacher's image). *No reference*: the student's score alone
    against the cut-off tau of percentile k (``taus``: k -> tau), as the adaptive pipeline decides.
    *No-reference ceiling*: the judge's own score of the student's image against its best cut-off, what
    a perfect no-reference oracle would reach (the truth also depends on the teacher's image, which no
    such oracle sees).

    Returns:
        ``{"pairs", "student_better_share", "full_reference", "no_reference": [{"k", "tau", "accuracy"}],
        "no_reference_ceiling": {"tau", "accuracy"}}``
    """
    s_o, t_o = np.asarray(student_oracle, float), np.asarray(teacher_oracle, float)
    s_j, t_j = np.asarray(student_judge, float), np.asarray(teacher_judge, float)
    decided = s_j != t_j
    truth = (s_j > t_j)[decided]
    full = (s_o > t_o)[decided]
    rows = [{"k": float(k), "tau": float(tau), "accuracy": float(np.mean((s_o[decided] >= tau) == truth))}
            for k, tau in sorted(taus.items())]
    cuts = np.append(np.unique(s_j[decided]), np.inf)
    right = [float(np.mean((s_j[decided] >= cut) == truth)) for cut in cuts]
    best = int(np.argmax(right))
    return {"pairs": int(decided.sum()), "student_better_share": float(truth.mean()),
            "full_reference": float(np.mean(full == truth)), "no_reference": rows,
            "no_reference_ceiling": {"tau": float(cuts[best]), "accuracy": right[best]}}


def synthetic_oracle(student_judge: np.ndarray, teacher_judge: np.ndarray, accuracy: float, seeds: int = 20,
                     student_satisfied: np.ndarray | None = None, teacher_satisfied: np.ndarray | None = None) -> dict:
    """Appendix D.4: the adaptive pipeline with an oracle of chosen accuracy (regeneration strategy).

    For each prompt the oracle says which of the two images is better; it is right with probability
    ``accuracy`` (a judge tie counts as right either way). The student image is kept where it says
    the student's, the teacher's used otherwise. Averaged over ``seeds`` draws.

    Returns:
        mean judge score, share satisfied (if given) and share sent to the teacher.
    """
    if not 0 <= accuracy <= 1:
        raise ValueError(f"oracle accuracy must be in [0, 1], got {accuracy}")
    s_j, t_j = np.asarray(student_judge, float), np.asarray(teacher_judge, float)
    truth = s_j >= t_j
    score, sat, teacher_share = [], [], []
    for seed in range(seeds):
        right = np.random.default_rng([seed, round(accuracy * 1e6)]).random(len(s_j)) < accuracy
        keep = np.where(right, truth, ~truth)
        score.append(np.where(keep, s_j, t_j).mean())
        teacher_share.append(1 - keep.mean())
        if student_satisfied is not None and teacher_satisfied is not None:
            sat.append(np.where(keep, student_satisfied, teacher_satisfied).mean())
    out = {"oracle_accuracy": accuracy, "mean_score": float(np.mean(score)),
           "teacher_share": float(np.mean(teacher_share))}
    if sat:
        out["accuracy"] = float(np.mean(sat))
    return out
