"""The serving engine: Algorithm 1 across requests, one queue per stage.

A request becomes a :class:`Job` of images (of draft slots, when its plan draws several drafts per prompt: each
prompt keeps its best-scoring draft once all are scored, as the pipeline does; :mod:`.jobs`). Each image passes
through up to three queues, the student's
(draw and decode), the oracle's (score) and the teacher's (improve and decode), and each queue forms its own
batches across requests: at most ``max_batch`` images that can share one model call (the same student steps and
guidance; the same teacher settings), sent when the batch is full or its oldest image has waited ``max_wait``
seconds. A job is routed once all its images are scored, by its own cut-off, capped by the load policy
(:mod:`tandem.serve.controller`). The model calls are the pipeline's own stages (:mod:`tandem.pipeline.stages`):
each image keeps the generator seeded from ``(seed, index)``, so a served image is the offline pipeline's image
of the same prompt and seed, up to the float rounding of another batch shape (one grey level, see the stages).

One worker thread runs the batches, the later stage first (finishing work in flight before starting more), a full
batch before a part one under load (``max_hold``); the web server's threads only submit, cancel and wait. Faults stay with their requests: a full queue refuses a job
(:class:`QueueFull`), a job past its deadline is dropped before it uses compute (:class:`DeadlineExceeded`), a
cancelled job's images leave the queues, and a model error fails the jobs of its batch (:class:`BatchFailed`,
with an id in the log), never the engine.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import replace

import torch

from ..generate import noise_shape, unit_noise
from ..pipeline.drafts import best_drafts, draft_generators
from ..pipeline.records import CostLedger
from ..pipeline.tandem import plan_path
from .compute import STAGES, StageBatch, run_stage
from .jobs import BatchFailed, Call, DeadlineExceeded, Image, Job, QueueFull, ShuttingDown, job_result, set_error
from .queues import StageQueue

log = logging.getLogger("tandem.serve")


class Engine:
    """Algorithm 1 served: a :class:`~tandem.pipeline.TandemPipeline` behind three batching queues.

    Args:
        pipe: the tandem (its student, teacher, oracle and calibration).
        max_batch: the largest batch of each stage (an int, or a dict by stage).
        max_wait: how long a stage's oldest image waits for its batch to fill, in seconds.
        max_hold: under load a worker runs full batches first (a teacher batch of 8 costs about two of 3); a part
            batch waits behind another stage's full one up to this long (seconds).
        max_queue: the most images the queues hold; a job that would pass it is refused (:class:`QueueFull`).
        policy: caps the teacher's share (:class:`tandem.serve.controller.FixedPolicy` or
            :class:`~tandem.serve.controller.LoadAwarePolicy`); None keeps every job's own cut-off.
        metrics: a :class:`tandem.serve.metrics.ServeMetrics` to report to, or None.
        backend: runs a stage's batch, ``backend(StageBatch) -> StageResult`` (default: :func:`run_stage` on
            ``pipe`` in this process; :mod:`tandem.serve.ray_app` sends it to the stage's deployment).
        workers: how many batches may run at once, by stage: None (one worker for all stages, the later stage
            first: right when the stages share this process's cores), or a dict such as ``{"student": 2,
            "oracle": 1, "teacher": 4}`` (workers of each stage's own, for stages computed elsewhere).
    """

    def __init__(self, pipe, max_batch: int | dict = 8, max_wait: float = 0.02, max_queue: int = 256,
                 policy=None, metrics=None, backend=None, workers: dict | None = None, max_hold: float = 1.0):
        self.pipe, self.policy, self.metrics, self.max_queue = pipe, policy, metrics, max_queue
        self.max_hold = max_hold
        self.backend = backend or (lambda batch: run_stage(pipe, batch))
        self.workers = workers
        sizes = max_batch if isinstance(max_batch, dict) else dict.fromkeys(STAGES, max_batch)
        keys = {"student": lambda im: (im.job.plan.steps, im.job.plan.guidance),
                "oracle": lambda im: (),
                "teacher": lambda im: _teacher_key(im.plan or im.job.plan)}
        self.queues = {s: StageQueue(s, int(sizes[s]), max_wait, keys[s]) for s in STAGES}
        self.calls: deque[Call] = deque()  # whole pipeline calls (edits), run between batches
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = self._draining = False
        self._running = 0  # images in the batches being computed
        self._batches = 0
        self._last = dict.fromkeys(STAGES, (1, 0.0))  # each stage's latest batch: (images, compute seconds)
        self.modules = pipe._counted_modules()
        self._noise = {"student": noise_shape(pipe.student), "teacher": noise_shape(pipe._teacher_any)}

    # -- the web side -------------------------------------------------------------------------------

    def start(self) -> Engine:
        if not self._threads:
            serves = ([(STAGES, True)] if self.workers is None else
                      [((stage,), stage == "student") for stage in STAGES for _ in range(self.workers.get(stage, 1))])
            for i, (stages, calls) in enumerate(serves):
                thread = threading.Thread(target=self._loop, args=(stages, calls), name=f"tandem-engine-{i}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def queued(self) -> dict[str, int]:
        with self._cond:
            return {s: len(q) for s, q in self.queues.items()}

    def submit(self, prompts: list[str], plan, seed: int, deadline_s: float, now: float | None = None) -> Job:
        """Queue a job of ``prompts`` under ``plan`` (checked beforehand); it finishes within ``deadline_s`` seconds
        or is dropped (:class:`DeadlineExceeded`). Refuses a job past ``max_queue`` (:class:`QueueFull`)."""
        now = time.monotonic() if now is None else now
        with self._cond:
            if self.policy is not None:  # the offered load, refused jobs included
                self.policy.arrived(len(prompts), now)
            self._admit(len(prompts) * plan.drafts)  # its draft slots, before their noise: a refusal costs nothing
            job = self.job(prompts, plan, seed, now, deadline_s)
            for im in job.images:
                prompt = im.index // job.drafts
                if plan.mode == "teacher" or (prompt in job.prerouted and im.plan is not None):
                    self._enqueue("teacher", im, now)
                elif prompt not in job.prerouted:
                    self._enqueue("student", im, now)
            self._cond.notify_all()
        return job

    def job(self, prompts: list[str], plan, seed: int, now: float = 0.0, deadline_s: float = math.inf) -> Job:
        """A job of ``prompts`` under ``plan``: each draft slot's generator from ``(seed, index)`` (and the draft)
        and its initial noise drawn from it, as the pipeline draws them. Under pre-routing the prompts the predictor
        sends ahead are found here (a text encoding); their first slot is the teacher's, drawn afresh."""
        gens = draft_generators(seed, len(prompts), plan.drafts)
        noise = unit_noise(*self._noise["teacher" if plan.mode == "teacher" else "student"], gens)
        job = Job(uuid.uuid4().hex[:12], list(prompts), plan, seed, now, now + deadline_s, gens, noise,
                  CostLedger(len(gens), self.modules), tau=plan.cut.tau)
        job.images = [Image(job, slot) for slot in range(len(gens))]
        job.kept = list(range(0, len(gens), plan.drafts))
        if plan.preroute is not None:
            p = self.pipe.predictor.p_below(job.prompts, self.pipe.text_features(job.prompts), plan.cut.tau)
            job.prerouted = {i for i, p_i in enumerate(p) if p_i >= plan.preroute}
            ahead = replace(plan, strategy="regenerate", regenerates=True, refine=None,
                            teacher_steps=plan.preroute_steps)
            for i in job.prerouted:
                job.images[i * plan.drafts].plan = ahead
        return job

    def compute(self, stage: str, batch: list[Image], batch_id: int = 0) -> float:
        """Run one stage's model calls on a batch of images (from any jobs with the same settings) through the
        backend, and give each image its outputs and its job what it cost; the seconds it took. Routing is the
        caller's (the engine's worker, or a profile)."""
        t0 = time.monotonic()
        for im in batch:
            im.stages.setdefault(stage, {"queue_s": 0.0})
            im.stages[stage].update(queue_s=t0 - im.enqueued if im.enqueued else 0.0, batch=batch_id,
                                    batch_size=len(batch))
        work = StageBatch(stage, batch[0].plan or batch[0].job.plan, [im.job.prompt(im.index) for im in batch],
                          torch.cat([im.job.noise[im.index:im.index + 1] for im in batch]),
                          [im.job.generators[im.index] for im in batch],
                          latents=[im.latent for im in batch] if stage == "teacher" else None,
                          images=[im.image for im in batch] if stage == "oracle" else None)
        out = self.backend(work)
        seconds = time.monotonic() - t0
        self._last[stage] = (len(batch), seconds)
        for j, im in enumerate(batch):
            im.stages[stage]["compute_s"] = seconds
            for key, per_image in out.costs.items():
                im.job.ledger.per_image[key][im.index] += per_image[j]
            if out.scores is not None:
                im.score = float(out.scores[j])
            if out.latents is not None:
                im.latent, im.image = out.latents[j:j + 1], out.images[j]
                if stage == "student":
                    im.student_image = out.images[j]
                else:
                    im.path = plan_path(im.plan or im.job.plan)
        if self.metrics is not None:
            self.metrics.batch(stage, len(batch), seconds, out.costs)
        return seconds

    def submit_call(self, fn, images: int, deadline_s: float, now: float | None = None) -> Call:
        """Queue ``fn()`` (a whole pipeline call of ``images`` images) to run on a worker between batches."""
        now = time.monotonic() if now is None else now
        call = Call(fn, images, now + deadline_s)
        with self._cond:
            self._admit(images)
            self.calls.append(call)
            self._cond.notify_all()
        return call

    def _admit(self, images: int) -> None:
        if self._draining or self._stopping:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        queued = sum(len(q) for q in self.queues.values()) + sum(c.images for c in self.calls) + self._running
        if queued + images > self.max_queue:
            raise QueueFull(queued, self.max_queue, self._retry_after(queued))

    def cancel(self, job: Job | Call) -> None:
        """Take a job's queued images out (its client left); a batch already running finishes."""
        with self._cond:
            job.cancelled = True
            if not isinstance(job, Call):
                self._drop(job)
            elif job in self.calls:
                self.calls.remove(job)
            if not job.future.done():
                job.future.cancel()
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Take no new jobs, finish the queued ones, stop the worker; True if everything finished in time."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
            end = None if timeout is None else time.monotonic() + timeout
            while any(self.queues.values()) or self.calls or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        return True

    # -- the worker ---------------------------------------------------------------------------------

    def _enqueue(self, stage: str, im: Image, now: float) -> None:
        im.enqueued = now
        im.stages[stage] = {"queue_s": 0.0, "compute_s": 0.0, "batch": None, "batch_size": 0}
        self.queues[stage].items.append(im)

    def _drop(self, job: Job) -> None:
        for q in self.queues.values():
            q.remove([im for im in q.items if im.job is job])

    def _retry_after(self, queued: int) -> int:
        return max(1, math.ceil(queued * (sum(s / n for n, s in self._last.values()) or 0.1)))  # from recent work

    def _next_batch(self, now: float, stages=STAGES, calls: bool = True
                    ) -> tuple[str | None, list[Image] | None, float | None]:
        """The batch of ``stages`` to run (the later stage first), or a call, or when the next one is due (a
        batch, or a deadline to drop a job at: under the lock)."""
        for q in self.queues.values():  # jobs past their deadline leave before they use compute
            for job in {id(im.job): im.job for im in q.items if im.job.deadline < now}.values():
                self._fail(job, DeadlineExceeded(f"the request waited past its deadline "
                                                 f"({job.deadline - job.arrival:.3g} s) and was dropped"))
        for call in [c for c in self.calls if c.deadline < now]:
            self.calls.remove(call)
            set_error(call.future, DeadlineExceeded("the request waited past its deadline and was dropped"))
        due, ready = [], {}
        for stage in reversed(stages):  # the later stage first
            batch, when = self.queues[stage].ready(now, flush=self._draining)
            if batch:
                ready[stage] = batch
            elif when is not None:
                due.append(when)
        if ready:  # behind another stage's full batch, a part batch waits up to max_hold to fill (saturation)
            full = [s for s, b in ready.items() if len(b) >= self.queues[s].max_batch]
            held = [s for s, b in ready.items() if s not in full and now - b[0].enqueued >= self.max_hold]
            stage = (held or full or list(ready))[0]
            return stage, ready[stage], None
        if calls and self.calls:
            return "call", [self.calls.popleft()], None
        due += [im.job.deadline for q in self.queues.values() for im in q.items] + [c.deadline for c in self.calls]
        return None, None, min(due) if due else None

    def _loop(self, stages=STAGES, calls: bool = True) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self.policy is not None:
                        self.policy.update(now, self._last)
                    stage, batch, due = self._next_batch(now, stages, calls)
                    if batch:
                        if stage != "call":
                            self.queues[stage].remove(batch)
                        running = len(batch) if stage != "call" else batch[0].images
                        self._running += running
                        self._batches += 1
                        batch_id = self._batches
                        break
                    self._cond.wait(None if due is None else max(due - now, 0.0) + 1e-4)
            try:
                if stage == "call":
                    self._call(batch[0])
                else:
                    self._run(stage, batch, batch_id)
            except Exception as e:  # a model error fails the batch's jobs, never the engine
                error_id = uuid.uuid4().hex[:8]
                log.exception("batch %d (%s, %d images) failed: error id %s", batch_id, stage, len(batch), error_id)
                with self._cond:
                    for job in {id(im.job): im.job for im in batch}.values():
                        self._fail(job, BatchFailed(error_id), cause=e)
            finally:
                with self._cond:
                    self._running -= running
                    self._cond.notify_all()

    def _fail(self, job: Job, error: Exception, cause: Exception | None = None) -> None:
        job.failed = True
        self._drop(job)
        if cause is not None:
            error.__cause__ = cause
        set_error(job.future, error)
        if self.metrics is not None:
            self.metrics.job_failed(type(error).__name__)

    def _call(self, call: Call) -> None:
        try:
            with torch.no_grad():
                result = call.fn()
        except ValueError as e:  # the pipeline refused the call's input: the client's error, not the model's
            set_error(call.future, e)
            return
        except Exception as e:
            error_id = uuid.uuid4().hex[:8]
            log.exception("a pipeline call failed: error id %s", error_id)
            failure = BatchFailed(error_id)
            failure.__cause__ = e
            set_error(call.future, failure)
            return
        if not call.future.done():
            call.future.set_result(result)

    def _run(self, stage: str, batch: list[Image], batch_id: int) -> None:
        self.compute(stage, batch, batch_id)
        now = time.monotonic()
        with self._cond:
            for im in batch:
                if not (im.job.cancelled or im.job.failed):
                    self._after(stage, im, now)

    def _after(self, stage: str, im: Image, now: float) -> None:
        """Where an image goes after ``stage`` (under the lock)."""
        job = im.job
        if stage == "student":
            if job.plan.mode == "adaptive" or job.drafts > 1:
                self._enqueue("oracle", im, now)
            else:
                im.path = "student"
                self._finish(im)
        elif stage == "oracle":
            job.scored += 1
            if job.scored == (job.n - len(job.prerouted)) * job.drafts:
                self._route(job, now)
        else:
            self._finish(im)

    def _route(self, job: Job, now: float) -> None:
        """Keep each prompt's best draft, and send those scoring below the job's cut-off to the teacher: its own
        tau, or the policy's cap (not for a route the policy chose for the load: it fits already)."""
        drawn = [i for i in range(job.n) if i not in job.prerouted]
        if job.drafts > 1:
            scores = [im.score for im in job.images if im.index // job.drafts not in job.prerouted]
            for i, slot in zip(drawn, best_drafts(scores, job.drafts)):
                job.kept[i] = i * job.drafts + slot % job.drafts
        kept = [job.images[job.kept[i]] for i in drawn]
        if job.plan.mode != "adaptive":
            for im in kept:
                im.path = "student"
                self._finish(im)
            return
        tau = job.plan.cut.tau
        if self.policy is not None and job.plan.route is None:
            tau, job.share_cap = self.policy.cap(tau, job.plan.cut.k)
        job.tau = tau
        for im in kept:
            if im.score < tau:
                self._enqueue("teacher", im, now)
            else:
                im.path = "accepted"
                self._finish(im)
        if self.metrics is not None:
            self.metrics.routed(sum(im.score < tau for im in kept) + len(job.prerouted), job.n)

    def _finish(self, im: Image) -> None:
        job = im.job
        job.finished += 1
        if job.finished < job.n or job.future.done():
            return
        done = time.monotonic()
        job.future.set_result(job_result(job, done))
        if self.metrics is not None:
            self.metrics.job_done(done - job.arrival)


def _teacher_key(plan) -> tuple:
    refine = None if plan.refine is None else (plan.refine.strength, plan.refine.num_inference_steps)
    return (plan.regenerates, plan.teacher_steps, plan.teacher_guidance, plan.teacher_scheduler, plan.handoff, refine)
