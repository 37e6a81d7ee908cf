"""Evaluation: per-image results of sampler configurations (cached, resumable), side-by-side win
rates with bootstrap confidence intervals, oracle accuracy, and the budget experiment (quality vs
cost curves of teacher samplers, students, refine-all and the adaptive pipeline)."""
