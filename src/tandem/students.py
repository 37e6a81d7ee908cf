"""The one student contract: what a distilled student is, written beside its weights.

Every distillation method saves its student the same way (:func:`save_student`)::

    student/
      unet/          the student's UNet2DConditionModel (safetensors)
      scheduler/     the diffusers scheduler that samples it, with its config
      student.json   what it is (:class:`StudentInfo`)

and :func:`tandem.load_student` (through this module's :func:`_load_student_dir`) turns any such directory
into a diffusers text-to-image pipeline that shares the teacher's VAE, text encoder and tokenizer: a
``LatentConsistencyModelPipeline`` for a student sampled by ``LCMScheduler`` (consistency students), a
``StableDiffusionPipeline`` with the student's own scheduler otherwise (progressive students on DDIM,
knowledge-distilled students on DPM-Solver++ with classifier-free guidance). Guidance enters in one of three ways:

* ``w-embedding``: the UNet takes the guidance scale through ``time_cond_proj_dim`` (one call per
  step; diffusers' pipelines feed it ``w - 1``),
* ``classifier-free``: conditional and unconditional calls mixed by the pipeline (two per step),
* ``none``: the UNet is called once with the caption, and the scale is ignored.

A ``student.json`` written before this contract (a consistency student: ``method`` and
``num_ddim_timesteps`` only) is read as the consistency student it is.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import load_pretrained, quote, read_json_file
from .denoiser import PREDICTION_TYPES
from .hub import check_model_dir, from_hub, is_dir, quiet_hub_libraries
from .outputs import atomic_write_text
from .reflect import install as install_reflection
from .reflect import student_reflection
from .sampling import CONSISTENCY, kind_of_scheduler, unet_evals_per_step

STUDENT_FILE = "student.json"
FORMAT = "tandem-student/1"
METHODS = ("consistency", "progressive", "knowledge", "adversarial", "dmd2")
VARIANTS = ("ddil", "reflected")  # written as METHOD+VARIANT, e.g. "consistency+ddil"
GUIDANCE = ("w-embedding", "classifier-free", "none")
# The samplers a student may name (a file from a user is data: it picks from this list, never imports).
SCHEDULERS = ("LCMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
              "UniPCMultistepScheduler", "TCDScheduler")


@dataclass(frozen=True)
class StudentInfo:
    """What a student is: how it was made and how it must be sampled.

    Attributes:
        method: ``consistency``, ``progressive``, ``knowledge``, ``adversarial`` or ``dmd2``, optionally
            with ``+ddil`` / ``+reflected``.
        scheduler: the diffusers scheduler class in ``scheduler/`` (its config is there).
        prediction_type: what the UNet predicts (``epsilon``, ``v_prediction``, ``sample``).
        guidance: how guidance enters: ``w-embedding``, ``classifier-free`` or ``none``.
        steps: default sampling steps.
        guidance_scale: default guidance scale (diffusers' convention, ``ε_u + w (ε_c - ε_u)``).
        teacher: the teacher it was distilled from, ``{"name": ..., "path": ...}``.
        timesteps: the timesteps it samples at its default steps (informative; the scheduler decides).
        details: the method's own facts (guidance range, rounds, architecture, training steps ...).
    """

    method: str
    scheduler: str
    prediction_type: str = "epsilon"
    guidance: str = "w-embedding"
    steps: int = 4
    guidance_scale: float = 5.0
    teacher: dict = field(default_factory=dict)
    timesteps: list[int] | None = None
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        base, _, variants = self.method.partition("+")
        if base not in METHODS or any(v not in VARIANTS for v in filter(None, variants.split("+"))):
            raise ValueError(f"unknown student method {self.method!r}; expected one of {', '.join(METHODS)}, "
                             f"optionally with {', '.join('+' + v for v in VARIANTS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unsupported student scheduler {self.scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; expected one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.guidance not in GUIDANCE:
            raise ValueError(f"unknown guidance {self.guidance!r}; expected one of {', '.join(GUIDANCE)}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.guidance_scale, int | float) or not 0 <= self.guidance_scale < float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")

    @property
    def base_method(self) -> str:
        return self.method.partition("+")[0]

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}


def read_student_info(path: str | Path) -> StudentInfo:
    """The :class:`StudentInfo` of a student directory (checked), or a ``ValueError`` naming what is wrong."""
    path = Path(path)
    check_student_dir(path)
    meta_path = path / STUDENT_FILE
    if not meta_path.is_file():
        scheduler = read_json_file(path / "scheduler" / "scheduler_config.json", "scheduler config")
        if scheduler.get("_class_name") != CONSISTENCY.scheduler:
            raise ValueError(f"student directory {quote(path)} has no {STUDENT_FILE} (expected the student/ "
                             "directory written by `tandem distill`)")
        meta = {"method": "consistency"}  # an LCM student written by hand or before the contract
    else:
        meta = read_json_file(meta_path, "student description")
    if "format" not in meta:  # a consistency student saved before the contract
        if meta.get("method") != "consistency":
            raise ValueError(f"{meta_path} is not a tandem student description (no 'format')")
        return StudentInfo(method="consistency", scheduler=CONSISTENCY.scheduler, guidance="w-embedding",
                           teacher=dict(meta.get("teacher") or {}),
                           details={k: v for k, v in meta.items() if k not in ("method", "teacher")})
    if meta["format"] != FORMAT:
        raise ValueError(f"{meta_path}: unsupported student format {meta['format']!r} (this tandem reads {FORMAT!r})")
    fields = {f.name for f in dataclasses.fields(StudentInfo)}
    unknown = sorted(set(meta) - fields - {"format"})
    if unknown:
        raise ValueError(f"{meta_path}: unknown keys {', '.join(unknown)}")
    try:
        return StudentInfo(**{k: v for k, v in meta.items() if k != "format"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: {e}") from None


def has_description(path: str | Path) -> bool:
    """Whether a student directory says what it is (``student.json``); one without it is read as a
    consistency student with the teacher's default steps and guidance."""
    return (Path(path) / STUDENT_FILE).is_file()


def check_student_dir(path: str | Path) -> Path:
    """``path`` if it is a student directory (``unet/config.json``, ``scheduler/scheduler_config.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"student directory {quote(path)} does not exist or is not a directory "
                         "(expected the student/ directory written by `tandem distill`)")
    missing = [p for p in ("unet", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise ValueError(f"student directory {quote(path)} lacks {', '.join(m + '/' for m in missing)} "
                         "(expected the student/ directory written by `tandem distill`)")
    check_model_dir(path, layout={"unet": "config.json", "scheduler": "scheduler_config.json"},
                    expected="the student/ directory written by `tandem distill`")
    return path


def save_student(unet, out_dir: str | Path, scheduler, info: StudentInfo, fp16: bool = False) -> Path:
    """Write ``out_dir/unet``, ``out_dir/scheduler`` and ``out_dir/student.json``; returns ``out_dir``.

    ``scheduler`` must be an instance of ``info.scheduler``; the UNet must take a w-embedding exactly
    when ``info.guidance`` says so.
    """
    if type(scheduler).__name__ != info.scheduler:
        raise ValueError(f"the scheduler is a {type(scheduler).__name__}, but the student says {info.scheduler}")
    _check_guidance(unet.config, info, "the student UNet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = unet.to(torch.float16) if fp16 else unet
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    atomic_write_text(out / STUDENT_FILE, json.dumps(info.to_json(), indent=2, default=str) + "\n")
    return out


def _check_guidance(config, info: StudentInfo, where: str) -> None:
    embedded = config.get("time_cond_proj_dim") is not None
    if embedded != (info.guidance == "w-embedding"):
        has = "has" if embedded else "has no"
        raise ValueError(f"{where} {has} a w-embedding (time_cond_proj_dim), but its guidance is {info.guidance!r}")


def load_student_parts(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """What the student directory ``path`` holds, loaded and checked against its ``student.json``:
    ``(info, unet, scheduler)``. Damaged, pickled or foreign weights are a ``ValueError`` naming the file
    (:func:`tandem.checks.load_pretrained`)."""
    import diffusers
    from diffusers import UNet2DConditionModel


    path = Path(path)
    info = read_student_info(path)
    unet = load_pretrained(UNet2DConditionModel.from_pretrained, path / "unet", "student UNet")
    unet = unet.to(device=device, dtype=dtype)
    _check_guidance(unet.config, info, f"{path / 'unet'}")
    scheduler = load_pretrained(getattr(diffusers, info.scheduler).from_pretrained, path / "scheduler",
                                "student scheduler")
    if scheduler.config.get("prediction_type", "epsilon") != info.prediction_type:
        raise ValueError(f"{path}: the scheduler predicts {scheduler.config.get('prediction_type')!r}, the student "
                         f"{info.prediction_type!r}")
    return info, unet, scheduler


def _load_student_dir(path: str | Path, base, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """A diffusers pipeline for the student directory ``path`` with ``base``'s VAE, text encoder and tokenizer:
    the path-based load under the public :func:`tandem.load_student` (and a student used as a teacher).

    Args:
        base: the teacher's pipeline (its components are shared, not copied), or the directory or hub id of
            a model whose components are loaded (its UNet is not).
    """
    import diffusers

    quiet_hub_libraries()
    from_model = isinstance(base, str | Path)
    if from_model and is_dir(Path(base)):
        # the student brings its UNet and scheduler; the rest comes from the model
        check_model_dir(base, ("vae", "text_encoder", "tokenizer"))
    path = Path(path)
    info, unet, scheduler = load_student_parts(path, device, dtype)
    install_reflection(scheduler, student_reflection(info))  # a reflected student thresholds its x₀ (DDIL section 3)
    cls = getattr(diffusers, kind_of_scheduler(info.scheduler).pipeline)
    extra = {"safety_checker": None, "requires_safety_checker": False}
    if from_model:
        pipe = from_hub(cls.from_pretrained, str(base), "model", unet=unet, scheduler=scheduler, dtype=dtype, **extra)
    else:
        pipe = cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                   scheduler=scheduler, feature_extractor=None, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.student_info = info  # what the loaders and the records read
    return pipe.to(device)


def student_info_of(pipe) -> StudentInfo | None:
    """The :class:`StudentInfo` of a pipeline made by :func:`tandem.load_student` (None for any other pipeline)."""
    return getattr(pipe, "student_info", None)


def check_student_guidance(pipe, guidance_scale: float) -> None:
    """Refuse classifier-free guidance for a student that samples without it (guidance "none": ADD, DMD2):
    a scale above 1 would double its calls and take it off what it was trained on."""
    info = student_info_of(pipe)
    if info is not None and info.guidance == "none" and guidance_scale > 1:
        raise ValueError(f"the {info.method} student samples without classifier-free guidance (its student.json "
                         f"says guidance 'none'); guidance scale {guidance_scale:g} would run it with guidance: "
                         "leave it unset, or 1")


def unet_cost(unet, context_length: int = 77, batch: int = 1) -> dict:
    """Parameters and forward FLOPs of one UNet call on ``batch`` latents (measured with
    ``torch.utils.flop_counter``, the text context ``context_length`` tokens long: the tokenizer's ``model_max_length``)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.zeros(batch, cfg.in_channels, size, size, dtype=unet.dtype, device=unet.device)
    context = torch.zeros(batch, context_length, cfg.cross_attention_dim, dtype=unet.dtype, device=unet.device)
    kwargs = {}
    if cfg.get("time_cond_proj_dim") is not None:
        kwargs["timestep_cond"] = torch.zeros(batch, cfg.time_cond_proj_dim, dtype=unet.dtype, device=unet.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, torch.tensor([500] * batch, device=unet.device), encoder_hidden_states=context, **kwargs)
    return {"params": int(sum(p.numel() for p in unet.parameters())),
            "flops_per_call": int(counter.get_total_flops() // batch)}


def shipped_students(spec) -> list[dict]:
    """Every student a model ships (``tandem.json``'s ``students``; a preset student not among them is
    listed as ``preset``), each with its method, directory, default steps and guidance, parameters and
    FLOPs per UNet call (measured), and its test-prompt accuracy at its default steps and guidance with
    the command that measured it (from the ``eval_test.json`` shipped beside it; None when absent)."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer


    entries = dict(spec.students)
    if spec.student is not None and all(e.path != spec.student.path for e in entries.values()):
        entries = {"preset": spec.student, **entries}
    context = AutoTokenizer.from_pretrained(Path(spec.path) / "tokenizer").model_max_length
    rows = []
    for name, entry in entries.items():
        path = Path(entry.path)
        info = read_student_info(path)
        unet = load_pretrained(UNet2DConditionModel.from_pretrained, path / "unet", "student UNet").float()
        cost = unet_cost(unet, context_length=context)
        calls = entry.steps * unet_evals_per_step(unet, entry.guidance_scale)
        row = {"name": name, "method": info.method, "dir": str(path), "steps": entry.steps,
               "guidance_scale": entry.guidance_scale, "guidance": info.guidance, "scheduler": info.scheduler,
               **cost, "flops_per_image": cost["flops_per_call"] * calls,
               "preset": spec.student is not None and entry.path == spec.student.path,
               "baseline": bool(info.details.get("baseline")),  # trained from data alone (no teacher), to compare
               "accuracy": None, "measured_by": None}
        results_path = path / "eval_test.json"
        if results_path.is_file():
            results = read_json_file(results_path, "evaluation")
            key = f"steps{entry.steps}_g{float(entry.guidance_scale)}"
            measured = results.get("student", {}).get(key)
            if measured is not None:
                row["accuracy"] = measured["accuracy"]
                row["measured_by"] = (f"tandem world evaluate --mode student --student {name} --student-steps "
                                      f"{entry.steps} --guidance-scale {entry.guidance_scale:g} --out OUT "
                                      f"(seed {results['config'].get('seed', 0)}, {results['config'].get('n_prompts')} "
                                      f"{results['config'].get('prompts_file')} prompts)")
        rows.append(row)
    return rows
