"""The one Trainer every training shares, built on Hugging Face ``accelerate``.

A *method* (a distillation method: consistency, progressive, knowledge distillation; or one of
the world's component trainings: VAE, CLIP, teacher, ControlNet, oracle) says what it trains
and how a loss is computed (:class:`~tandem.training.method.Method`); the Trainer owns everything else:

- devices and processes (the same code on a CPU, one GPU, or ``torchrun`` / ``accelerate
  launch`` over many; DDP via ``accelerate``; FSDP through an accelerate config),
- mixed precision (``bf16``/``fp16`` where the device supports it),
- one optimizer per trainable network, each with its own update ratio (``every``) and LR
  schedule (linear warm-up, then constant or a cosine decay to 0 at ``max_steps``; or stages, each
  with its own length, peak, warm-up and shape, as a training in several warm-started stages has),
- gradient accumulation and clipping, EMA copies (kept per network, by name),
- JSONL logs (every loss the method returns, the gradient norm and the LR) and a progress bar
  on the main process,
- snapshots of what the method exports at chosen steps (``snapshot_every``: accuracy against training
  steps from one run),
- periodic atomic checkpoints and exact resume: weights, optimizers, LR schedules, EMAs,
  every process's RNG states and the data position (the step). Checkpoints hold tensors and
  plain data only and are read with ``torch.load(weights_only=True)``: resuming never runs code
  from a file, and a file that would is refused.

A run directory holds ``train_config.json`` (the run's configuration), ``log.jsonl``,
``checkpoint/`` (``state.pt``, ``rng-<process>.pt``, ``meta.json``), what the method exports and,
once the run has finished, ``done.json``; :mod:`tandem.training.checkpoints` checks it and reads
its checkpoints.

Data comes from a :class:`~tandem.distill.data.BatchSource`: batch ``i`` is a pure function
of ``i``, so the data position is the step and a resumed run sees the batches an
uninterrupted run would have seen. Each optimisation step of each process reads batch
``(step * grad_accum + micro) * world_size + rank``. A data-free method (``uses_data = False``)
draws its own batch from that index (``ctx.batch_index``), as the world's trainings draw theirs
from the world's stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import NonFiniteError, first_difference, read_json_file
from ..generate import derive_seed
from ..outputs import atomic_write_text, staged_dir
from .checkpoints import (
    RESUMABLE_CHANGES,
    RUN_CONFIG,
    check_run_dir,
    find_checkpoint,
    load_checkpoint_file,
    read_checkpoint_meta,
    remove_path,
    restore_entry,
    set_rng_state,
    trim_log,
    without_resumable_changes,
    write_checkpoint,
)
from .config import TrainerConfig, check_precision
from .method import EMACopy, Method, StepContext
from .schedules import lr_lambda

_STATE_PARTS = ("models", "optimizers", "schedulers", "emas")  # of checkpoint/state.pt
SNAPSHOT_DIR = "snapshots"


class Trainer:
    """Train ``method`` into ``out_dir``.

    A new run needs a new or empty directory (``keep``: names it may already hold); ``resume=True``
    continues the run in it, and then the run's saved configuration must match, except for ``max_steps``
    and ``threads``.
    ``source`` is the data (a ``BatchSource``; ``None`` for a data-free method); ``run_config`` is saved
    in ``train_config.json`` beside the method's name and the Trainer's config; ``cpu`` forces the CPU
    [default: the GPU where there is one].
    """

    def __init__(self, method: Method, source, cfg: TrainerConfig, out_dir: str | Path,
                 resume: bool = False, run_config: dict | None = None, cpu: bool | None = None,
                 keep: tuple[str, ...] = (), snapshot: Callable[[Path], None] | None = None):
        from accelerate import Accelerator

        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.method, self.source, self.cfg = method, source, cfg
        self.dir = Path(out_dir)
        self.resume, self.keep, self.snapshot = resume, keep, snapshot
        if cfg.snapshot_every is not None and snapshot is None:
            raise ValueError(f"method {method.name}: snapshot_every is set but nothing exports a snapshot")
        self.run_config = {"method": method.name, "trainer": dataclasses.asdict(cfg), **(run_config or {})}
        if cpu is None:
            cpu = not torch.cuda.is_available()
        check_precision(cfg.mixed_precision, cpu)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
        checkpoint = self._check_run_dir()
        torch.manual_seed(cfg.seed)
        self.trainables = {t.name: t for t in method.trainables()}  # each checked by Trainable.__post_init__
        if not self.trainables:
            raise ValueError(f"method {method.name} declares no trainable networks")
        self._frozen = {}
        for name, module in method.frozen().items():
            self._frozen[name] = module.to(self.accelerator.device).eval().requires_grad_(False)
        # EMA copies are taken before prepare(), which may wrap or shard the modules (DDP, FSDP)
        device = self.accelerator.device
        self._emas = {t.name: {e: EMACopy(t.module, d, device) for e, d in t.emas.items()}
                      for t in self.trainables.values()}
        self._optimizers, self._schedulers, self._prepared = {}, {}, {}
        for t in self.trainables.values():
            if t.lr_stages and sum(stage.steps for stage in t.lr_stages) != cfg.max_steps:
                raise ValueError(f"{t.name}: the LR stages add up to {sum(s.steps for s in t.lr_stages)} steps, "
                                 f"not the run's max_steps {cfg.max_steps}")
            params = [p for p in t.module.parameters() if p.requires_grad]
            opt = (t.make_optimizer(params) if t.make_optimizer is not None
                   else torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, cfg.max_steps, t.lr_schedule,
                                                                    t.lr_stages))
            # the LR schedule stays unprepared: accelerate would step it once per process
            module, opt = self.accelerator.prepare(t.module, opt)
            self._prepared[t.name], self._optimizers[t.name], self._schedulers[t.name] = module, opt, sched
        self.ctx = StepContext(self.accelerator, self._prepared, self._emas, self._frozen)
        self.start_step = self._load(checkpoint) if checkpoint is not None else 0
        self.steps_done = self.start_step  # what an export records as the steps trained
        self._open_run()

    # -- run directory -------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _check_run_dir(self) -> Path | None:
        """Every check of the run directory, in every process, before anything is loaded or written."""
        ckpt = check_run_dir(self.dir, self.resume, self.cfg.max_steps, self.accelerator.num_processes, self.keep)
        if self.resume:
            cfg_path = self.dir / RUN_CONFIG
            saved = without_resumable_changes(read_json_file(cfg_path, "run config"))
            requested = without_resumable_changes(_jsonable(self.run_config))
            if saved != requested:
                raise ValueError(f"resume=True: the configuration differs from the one saved in {cfg_path} "
                                 f"({first_difference(saved, requested)}); a resumed run may change only "
                                 f"{', '.join(map(repr, RESUMABLE_CHANGES))}")
        self.accelerator.wait_for_everyone()
        return ckpt

    def _open_run(self) -> None:
        """Write the run's config (a resumed run: once its checkpoint has loaded, with its log trimmed to the
        checkpoint's step and the previous ``done.json`` removed until the run finishes again)."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if self.resume:
                trim_log(self.dir / "log.jsonl", self.start_step)
                (self.dir / "done.json").unlink(missing_ok=True)
            atomic_write_text(self.dir / RUN_CONFIG, json.dumps(_jsonable(self.run_config), indent=2) + "\n")
        self.accelerator.wait_for_everyone()

    # -- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        unwrap = self.accelerator.unwrap_model
        return {
            "models": {n: unwrap(m).state_dict() for n, m in self._prepared.items()},
            "optimizers": {n: o.state_dict() for n, o in self._optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self._schedulers.items()},
            "emas": {n: {e: c.module.state_dict() for e, c in emas.items()} for n, emas in self._emas.items()},
            **({"method": state} if (state := _method_state(self.method)) is not None else {}),
        }

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint/`` atomically (:func:`~tandem.training.checkpoints.write_checkpoint`)."""
        write_checkpoint(self.dir, self.accelerator, self._state, step)

    def _load(self, ckpt: Path) -> int:
        """Restore weights, optimizers, LR schedules, EMAs and this process's RNG states from ``ckpt``."""
        acc = self.accelerator
        meta = read_checkpoint_meta(ckpt)
        state_path = ckpt / "state.pt"
        state = load_checkpoint_file(state_path)
        if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in _STATE_PARTS):
            raise ValueError(f"checkpoint {state_path} is not a tandem Trainer checkpoint")
        for n, m in self._prepared.items():
            restore_entry(acc.unwrap_model(m), state, ("models", n), state_path)
        for n, o in self._optimizers.items():
            restore_entry(o, state, ("optimizers", n), state_path)
        for n, s in self._schedulers.items():
            configured = list(s.base_lrs)  # this run's peak LRs: a resume may lower them (a run that diverged)
            restore_entry(s, state, ("schedulers", n), state_path)
            s.base_lrs = configured
            for group, base_lr in zip(s.optimizer.param_groups, configured):
                group["initial_lr"] = base_lr
            # the next step's LR under this run's schedule, not the one saved with the optimizer: they differ
            # when a run resumes with another max_steps (a cosine decays to the new end); else the same bits
            for group, base_lr, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base_lr * factor(s.last_epoch)
            s._last_lr = [group["lr"] for group in s.optimizer.param_groups]
        for n, emas in self._emas.items():
            for e, c in emas.items():
                restore_entry(c.module, state, ("emas", n, e), state_path)
        if _method_state(self.method) is not None:
            restore_entry(self.method, state, ("method",), state_path)
        rng_path = ckpt / f"rng-{acc.process_index}.pt"
        set_rng_state(load_checkpoint_file(rng_path), rng_path)
        return meta["step"]

    # -- training ------------------------------------------------------------------------------------

    def _batches(self, step: int) -> Iterator[tuple[int, int, Any]]:
        """``(micro, batch index, batch)`` for this process's micro-batches of ``step``."""
        acc, cfg = self.accelerator, self.cfg
        for micro in range(cfg.grad_accum):
            index = (step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index
            yield micro, index, (self.source.batch(index, cfg.batch_size) if self.method.uses_data else None)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step of every trainable that is due; returns losses averaged over processes."""
        acc, cfg, ctx = self.accelerator, self.cfg, self.ctx
        logged: dict[str, float] = {}
        ctx.step = step
        for name, t in self.trainables.items():
            if step % t.every:
                continue
            model, opt = self._prepared[name], self._optimizers[name]
            self._zero_grads()  # networks that train against each other never see each other's gradients
            sums: dict[str, float] = {}
            for micro, index, batch in self._batches(step):
                # randomness follows the batch index: n processes x 1 micro-batch draw exactly what
                # 1 process x n micro-batches draws, so the two runs compute the same update
                ctx.micro, ctx.batch_index = micro, index
                ctx.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, index, _name_key(name)))
                last = micro == cfg.grad_accum - 1
                with nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model):
                    with acc.autocast():
                        losses = self.method.step(batch, name, ctx)
                    if "loss" not in losses:
                        raise KeyError(f"method {self.method.name}: step() must return a 'loss' for {name}")
                    self._check_finite(losses, name, step)
                    acc.backward(losses["loss"] / cfg.grad_accum)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if t.grad_clip is not None:
                sums["grad_norm"] = float(acc.clip_grad_norm_(self._clipped(name), t.grad_clip))
            opt.step()
            self._schedulers[name].step()
            self._zero_grads()
            for e in self._emas[name].values():
                e.update(acc.unwrap_model(model))
            for k, v in sums.items():
                logged[f"{name}/{k}" if len(self.trainables) > 1 else k] = v
        if acc.num_processes > 1 and logged:
            keys = sorted(logged)
            values = acc.reduce(torch.tensor([logged[k] for k in keys], device=acc.device), reduction="mean")
            logged = dict(zip(keys, values.tolist()))
        return logged

    def _check_finite(self, losses: dict, name: str, step: int) -> None:
        """Stop the run at the first non-finite loss, naming it (before it reaches any weight); the method's
        ``divergence_hint`` says what to try."""
        for key, value in losses.items():
            if not bool(torch.isfinite(value.detach()).all()):
                lower = getattr(self.method, "divergence_hint", "a lower lr")
                ckpt = find_checkpoint(self.dir)
                if ckpt is not None:
                    hint = (f"resume from its last checkpoint (step {read_checkpoint_meta(ckpt)['step']}) with "
                            f"resume=True and {lower}")
                else:
                    hint = f"it wrote no checkpoint yet, so nothing of it is kept: start it again with {lower}"
                raise NonFiniteError(f"{self.method.name} diverged: the {name}'s {key} is {float(value.detach())} at "
                                     f"step {step}; {hint}")

    def _clipped(self, name: str) -> list[nn.Parameter]:
        """The parameters whose gradients ``name``'s clipping measures: those its optimizer steps, in the
        optimizer's order (the order the norm sums in; parameter groups may reorder the network's), or, under
        FSDP, the prepared network's own (accelerate clips a sharded network through it)."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return list(self._prepared[name].parameters())
        return [p for group in self._optimizers[name].param_groups for p in group["params"]]

    def _zero_grads(self) -> None:
        """Drop the gradients of every trainable network (each optimizer holds one network's parameters)."""
        for opt in self._optimizers.values():
            opt.zero_grad(set_to_none=True)

    def train(self) -> int:
        """Run from the start (or the resumed) step to ``max_steps``; returns the final step. A new run that fails
        before its first checkpoint removes what it wrote (:meth:`_forget_unsaved_run`)."""
        try:
            self._train_loop()
        except Exception:
            self._forget_unsaved_run()
            raise
        return self.cfg.max_steps

    def _forget_unsaved_run(self) -> None:
        """A new run that fails before its first checkpoint (bad data, divergence) keeps nothing to resume: remove
        what it wrote (its config, log and snapshots), so that the corrected run may start in the same ``--out``."""
        if self.resume or not self.is_main or find_checkpoint(self.dir) is not None:
            return
        for name in (RUN_CONFIG, "log.jsonl", SNAPSHOT_DIR):
            remove_path(self.dir / name)

    def _train_loop(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.cfg
        log_path = self.dir / "log.jsonl"
        t0 = time.time()
        columns = (TextColumn(f"[bold]{self.method.name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        show = self.is_main and os.environ.get("TANDEM_PROGRESS", "1") != "0"
        with Progress(*columns, disable=not show) as bar:
            task = bar.add_task(self.method.name, total=cfg.max_steps, completed=self.start_step, info="")
            for step in range(self.start_step, cfg.max_steps):
                losses = self.train_step(step)
                done = self.steps_done = step + 1
                if self.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps):
                    record = {"step": done, "time": round(time.time() - t0, 2), **losses,
                              "lr": {n: s.get_last_lr()[0] for n, s in self._schedulers.items()}}
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.update(task, info=" ".join(f"{k}={v:.4f}" for k, v in losses.items()))
                if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.max_steps:
                    self.save_snapshot(done)
                if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                    self.save_checkpoint(done)
                bar.update(task, completed=done)

    def save_snapshot(self, step: int) -> None:
        """Export the method's result as it stands into ``snapshots/step-<step>`` (main process; written beside it
        and swapped into place by :func:`tandem.outputs.staged_dir`, so a snapshot is whole or absent; one a crashed
        run wrote before its checkpoint is replaced by the resumed run's, which is the same)."""
        if self.is_main:
            with staged_dir(self.dir / SNAPSHOT_DIR / f"step-{step}") as staging:
                self.snapshot(staging)
        self.accelerator.wait_for_everyone()

    def export(self, name: str, ema: str | None = None) -> nn.Module:
        """The trained network ``name`` (or its EMA copy ``ema``), unwrapped, on the training device."""
        return self._emas[name][ema].module if ema else self.accelerator.unwrap_model(self._prepared[name])

    def finish(self, summary: dict) -> None:
        if self.is_main:
            atomic_write_text(self.dir / "done.json", json.dumps(_jsonable(summary), indent=2) + "\n")
        self.accelerator.wait_for_everyone()


def _method_state(method) -> dict | None:
    """The method's own state to checkpoint, or None (no ``state_dict``, or it returns None)."""
    return method.state_dict() if hasattr(method, "state_dict") else None


def _name_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") & (2**62 - 1)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
