"""Figures for evaluation results (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def _save(fig, ax, path: str | Path, legend: str = "lower right") -> Path:
    """Grid, legend (at ``legend``: a matplotlib location or "outside"), layout; write ``path`` (PNG) and
    close the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if legend == "outside":  # right of the axes, clear of every point
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8, loc=legend)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_quality_vs_steps(student: dict, path: str | Path, reference: dict | None = None,
                          metric: str = "accuracy", title: str | None = None) -> Path:
    """Student quality against its sampling steps, one line per guidance scale, with an optional
    reference (the teacher) as a dashed line labelled with its UNet evaluations.

    Args:
        student: ``{key: summary}`` from ``tandem world evaluate --mode student`` (each summary has
            ``settings.steps``, ``settings.guidance_scale`` and ``metric``).
        reference: ``{label: (value, unet_evals)}``.
    """
    fig, ax = _figure((5.5, 3.8))
    lines: dict[float, list[tuple[int, float]]] = {}
    for summary in student.values():
        s = summary["settings"]
        lines.setdefault(s["guidance_scale"], []).append((s["steps"], summary[metric]))
    for g, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=f"student, guidance {g:g}")
    for label, (value, evals) in (reference or {}).items():
        ax.axhline(100 * value, linestyle="--", color="black", linewidth=1)
        ax.annotate(f"{label} ({evals} UNet evals)", (0.02, 100 * value), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 4), fontsize=8)
    steps = sorted({p[0] for pts in lines.values() for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("student steps (UNet evaluations per image)")
    ax.set_ylabel("captions satisfied (%)" if metric == "accuracy" else metric)
    ax.set_title(title or "quality vs. steps")
    return _save(fig, ax, path)


def plot_quality_vs_flops(series: dict[str, list[tuple[float, float, str]]], path: str | Path,
                          title: str | None = None) -> Path:
    """Quality against the UNet FLOPs spent per image (Dockhorn et al.'s Fig. 2 view): one line per
    model, its points at several step counts.

    Args:
        series: ``{label: [(flops per image, accuracy in [0, 1], point label), ...]}``.
    """
    fig, ax = _figure((8.0, 4.0))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] / 1e9 for p in points], [100 * p[1] for p in points], marker="o", label=label)
        for flops, acc, text in points:
            ax.annotate(text, (flops / 1e9, 100 * acc), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("UNet GFLOPs per image (all steps, guidance included)")
    ax.set_ylabel("captions satisfied (%)")
    ax.set_title(title or "quality vs. compute")
    return _save(fig, ax, path, legend="outside")
