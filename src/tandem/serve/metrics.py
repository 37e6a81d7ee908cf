"""The server's metrics in Prometheus' text format (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    """Requests by endpoint and status, request latency, each stage's batches (size, seconds) and queue depth,
    the share of images the teacher improved, the current cut-off and teacher-share cap, UNet evaluations, and
    the PyTorch threads the server computes with."""

    def __init__(self, threads: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tandem_requests", "Requests answered, by endpoint and HTTP status",
                                ("endpoint", "status"), registry=r)
        self.latency = Histogram("tandem_request_latency_seconds", "Seconds from arrival to answer of a "
                                 "successful request", ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tandem_batch_size", "Images per batch, by stage", ("stage",),
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("tandem_batch_seconds", "Seconds per batch, by stage", ("stage",),
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tandem_queue_depth", "Images waiting, by stage", ("stage",), registry=r)
        self.images = Counter("tandem_images_routed", "Adaptive images routed, by where they went", ("route",),
                              registry=r)
        self.teacher_share = Gauge("tandem_teacher_share", "Share of adaptive images the teacher improved so far",
                                   registry=r)
        self.threshold = Gauge("tandem_threshold", "The cut-off tau of a request with the default settings, "
                               "under the current cap", registry=r)
        self.share_cap = Gauge("tandem_teacher_share_cap", "The load policy's cap on the teacher's share "
                               "(1: no cap)", registry=r)
        self.arrival_rate = Gauge("tandem_arrival_rate", "Images per second arriving (the load policy's window)",
                                  registry=r)
        self.unet_evals = Counter("tandem_unet_evaluations", "UNet evaluations (batch rows), by model",
                                  ("model",), registry=r)
        self.failures = Counter("tandem_jobs_failed", "Jobs that failed, by reason", ("reason",), registry=r)
        self.threads = Gauge("tandem_torch_threads", "PyTorch threads the server computes with", registry=r)
        self.threads.set(threads)
        self.share_cap.set(1.0)
        self._routed = [0, 0]

    def batch(self, stage: str, size: int, seconds: float, costs: dict) -> None:
        """A stage's batch of ``size`` images took ``seconds``; ``costs`` are its per-image counts by key."""
        self.batch_size.labels(stage).observe(size)
        self.batch_seconds.labels(stage).observe(seconds)
        for model in ("student", "teacher"):
            rows = float(costs[model].sum())
            if rows:
                self.unet_evals.labels(model).inc(rows)

    def routed(self, to_teacher: int, n: int) -> None:
        self.images.labels("teacher").inc(to_teacher)
        self.images.labels("accepted").inc(n - to_teacher)
        self._routed[0] += to_teacher
        self._routed[1] += n
        self.teacher_share.set(self._routed[0] / self._routed[1])

    def job_done(self, seconds: float) -> None:
        pass  # the request's latency is observed by the web layer, with its endpoint

    def job_failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
