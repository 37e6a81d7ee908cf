"""The load benchmark's report (:mod:`tandem.eval.serve_load`): its statistics (throughput, latency percentiles,
SLO violations, the teacher's share, cost, accuracy), its timeline, and its plot of latency, the teacher's share
and the exact checker's accuracy over the run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    """One request as the client saw it; ``images`` holds each image's record (path, student_score, tau,
    unet_evals, serving) and, once judged, ``satisfied``."""

    index: int
    prompt: str
    seed: int
    scheduled_s: float  # when it was due, seconds from the start
    sent_s: float | None = None  # when it went out
    status: int | None = None  # HTTP status; None: no answer (transport error, or unfinished at the end)
    latency_s: float | None = None  # send to answer, as the client measured it
    error: str | None = None
    request_id: str | None = None
    tau: float | None = None
    teacher_share_cap: float | None = None
    server_latency_s: float | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    pngs: list[bytes] = field(default_factory=list, repr=False)  # kept for judging; not written

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pngs")
        return out


TEACHER_PATHS = ("refined", "regenerated", "teacher")  # the images the teacher drew or improved


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])  # linear interpolation between order statistics
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(a.mean()), "max": float(a.max())}


def summarize(results: list[RequestResult], wall_s: float, slo_ms: float | None) -> dict[str, Any]:
    """The report's statistics of one run (see the module docstring for each definition)."""
    ok = [r for r in results if r.status == 200]
    images = [image for r in ok for image in r.images]
    by_status: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status is not None else ("unfinished" if r.error and r.error.startswith(
            "unfinished") else "transport_error")
        by_status[key] = by_status.get(key, 0) + 1
    paths: dict[str, int] = {}
    for image in images:
        paths[image["path"]] = paths.get(image["path"], 0) + 1
    teacher = sum(paths.get(p, 0) for p in TEACHER_PATHS)
    evals = {model: [float(image["unet_evals"][model]) for image in images if model in (image["unet_evals"] or {})]
             for model in ("student", "teacher", "total")}
    slo = None
    if slo_ms is not None:
        violations = sum(1 for r in results if r.status != 200 or r.latency_s * 1000 > slo_ms)
        slo = {"slo_ms": slo_ms, "violations": violations, "ratio": violations / len(results) if results else None,
               "rule": "a request violates if it did not succeed (status other than 200, a transport error, or no "
                       "answer by the end) or its latency is over slo_ms"}
    judged = [image["satisfied"] for image in images if image.get("satisfied") is not None]
    return {
        "sent": len(results), "completed": len(ok), "by_status": dict(sorted(by_status.items())),
        "images": len(images), "wall_s": wall_s,
        "throughput": {"requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
                       "images_per_s": len(images) / wall_s if wall_s > 0 else None,
                       "rule": "completed requests (images) over wall_s: from the start to the end of sending "
                               "(duration_s, or the last send when max_requests cut it short) or to the last "
                               "answer, whichever is later"},
        "latency_s": _percentiles([r.latency_s for r in ok]),
        "slo": slo,
        "teacher_share": teacher / len(images) if images else None,
        "paths": dict(sorted(paths.items())),
        "unet_evals_per_image": {m: float(np.mean(v)) if v else None for m, v in evals.items()},
        "accuracy": ({"judged": len(judged), "satisfied": int(sum(judged)), "accuracy": float(np.mean(judged)),
                      "unjudged": sum(1 for image in images if image.get("satisfied") is None)} if judged else None),
        "stages": _stage_means(images),
    }


def _stage_means(images: list[dict]) -> dict[str, dict[str, float]]:
    """Mean seconds queued and computing per stage, over the images that passed through it."""
    seen: dict[str, list[tuple[float, float]]] = {}
    for image in images:
        for stage, times in ((image.get("serving") or {}).get("stages") or {}).items():
            seen.setdefault(stage, []).append((times.get("queue_s") or 0.0, times.get("compute_s") or 0.0))
    return {stage: {"queue_s": float(np.mean([q for q, _ in v])), "compute_s": float(np.mean([c for _, c in v])),
                    "images": len(v)} for stage, v in sorted(seen.items())}


def timeline(results: list[RequestResult], window_s: float) -> list[dict[str, Any]]:
    """Per request, by send time: its latency, and over the images of requests sent in the last ``window_s``
    seconds (rolling), the teacher's share and the checker's accuracy."""
    rows = []
    sent = sorted((r for r in results if r.sent_s is not None), key=lambda r: r.sent_s)
    for r in sent:
        recent = [image for s in sent if r.sent_s - window_s < s.sent_s <= r.sent_s and s.status == 200
                  for image in s.images]
        judged = [image["satisfied"] for image in recent if image.get("satisfied") is not None]
        rows.append({"t": r.sent_s, "latency_s": r.latency_s, "ok": r.status == 200, "tau": r.tau,
                     "teacher_share_cap": r.teacher_share_cap,
                     "teacher_share": (sum(image["path"] in TEACHER_PATHS for image in recent) / len(recent)
                                       if recent else None),
                     "accuracy": float(np.mean(judged)) if judged else None})
    return rows


def plot_load(rows: list[dict], samples: list[dict], slo_ms: float | None, path: str | Path,
              window_s: float, title: str = "") -> Path:
    """Latency (with the SLO line), the teacher's share (rolling, with the server's cap) and the checker's
    accuracy (rolling) against time since the start, in three panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, share, acc) = plt.subplots(3, 1, figsize=(8, 8), dpi=110, sharex=True)
    ok = [r for r in rows if r["ok"]]
    failed = [r for r in rows if not r["ok"]]
    lat.scatter([r["t"] for r in ok], [r["latency_s"] for r in ok], s=12, label="answered (200)")
    if failed:
        top = max([r["latency_s"] or 0 for r in rows] + [slo_ms / 1000 if slo_ms else 0])
        lat.scatter([r["t"] for r in failed], [r["latency_s"] or top for r in failed], marker="x", color="C3",
                    s=20, label="failed")
    if slo_ms is not None:
        lat.axhline(slo_ms / 1000, color="C3", linestyle="--", label=f"SLO {slo_ms:g} ms")
    lat.set_ylabel("latency (s)")
    _line(share, rows, "teacher_share", f"teacher share (last {window_s:g} s)")
    cap = [(s["t"], s["teacher_share_cap"]) for s in samples if "teacher_share_cap" in s]
    if cap:
        share.step(*zip(*cap), where="post", color="C1", linestyle="--", label="share cap (/metrics)")
    share.set_ylabel("teacher share")
    share.set_ylim(-0.05, 1.05)
    if any(r["accuracy"] is not None for r in rows):
        _line(acc, rows, "accuracy", f"exact checker accuracy (last {window_s:g} s)")
    else:
        acc.text(0.5, 0.5, "no exact checker (not the world)", ha="center", va="center", transform=acc.transAxes)
    acc.set_ylabel("accuracy")
    acc.set_ylim(-0.05, 1.05)
    acc.set_xlabel("time since start (s), by send time")
    for ax in (lat, share, acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    if title:
        lat.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _line(ax, rows: list[dict], key: str, label: str) -> None:
    points = [(r["t"], r[key]) for r in rows if r[key] is not None]
    if points:
        ax.plot(*zip(*points), marker=".", label=label)
