"""ShapesWorld's oracle: a learned, no-reference quality estimator of (image, caption) -- the
world's ImageReward.

Like ImageReward (BLIP's image-grounded text encoder + an MLP), it encodes the caption's tokens
while they cross-attend to the image's patches, pools them and regresses one number, higher is
better. It starts from the world's CLIP (both towers) and is trained on images of varied quality
that tandem's own models draw -- student samples at 1, 2 and 4 steps, teacher samples at 5, 10 and
25 steps, teacher refinements of student samples, exact renderings and corrupted renderings --
each labelled with the exact checker's soft score. At inference it never calls the checker: the
checker stays the independent judge, as humans are of ImageReward.

    tandem world train oracle --out runs/oracle     # data (cached), training, held-out evaluation
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .runs import Run, atomic_write_text, config_dict

TRAIN_SEED = 101  # stream seeds no other world run uses: oracle training prompts ...
EVAL_SEED = 102   # ... and its held-out evaluation prompts
KINDS = ("student1", "student2", "student4", "teacher5", "teacher10", "teacher25", "refined", "render", "corrupt")


@dataclass(frozen=True)
class OracleArch:
    fusion_layers: int = 2
    heads: int = 4
    ff: int = 256
    head_hidden: int = 64


class WorldOracle(nn.Module):
    """score(images [B, 3, H, W] in [0, 1], token ids [B, L]) -> [B]."""

    def __init__(self, clip_config: dict, arch: OracleArch = OracleArch()):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        self.clip_config, self.arch = clip_config, arch
        clip = CLIPModel(CLIPConfig.from_dict(clip_config))
        self.vision, self.text = clip.vision_model, clip.text_model
        d = clip.config.text_config.hidden_size
        dv = clip.config.vision_config.hidden_size
        self.to_text = nn.Linear(dv, d)
        layer = nn.TransformerDecoderLayer(d, arch.heads, arch.ff, dropout=0.0, batch_first=True, norm_first=True)
        self.fusion = nn.TransformerDecoder(layer, arch.fusion_layers)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, arch.head_hidden), nn.GELU(),
                                  nn.Linear(arch.head_hidden, 1))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        patches = self.vision(pixel_values=images * 2 - 1).last_hidden_state
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        fused = self.fusion(tokens, self.to_text(patches), tgt_key_padding_mask=~mask)
        pooled = (fused * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled).squeeze(-1)

    @classmethod
    def from_clip(cls, clip_dir: str | Path, arch: OracleArch = OracleArch()) -> WorldOracle:
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(clip_dir)
        model = cls(clip.config.to_dict(), arch)
        model.vision.load_state_dict(clip.vision_model.state_dict())
        model.text.load_state_dict(clip.text_model.state_dict())
        return model

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(
            {"model": "tandem.world.oracle.WorldOracle", "arch": config_dict(self.arch),
             "clip": self.clip_config}, indent=1) + "\n")
        save_file({k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()},
                  str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> WorldOracle:
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        model = cls(config["clip"], OracleArch(**config["arch"]))
        state = load_file(str(path / "model.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.eval()


def _tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _as_unit_tensor(images) -> torch.Tensor:
    """Float [B, 3, H, W] in [0, 1] from such a tensor, uint8 [H, W, 3] arrays, or PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return images.float().cpu()
    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    if any(a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
        raise ValueError("expected uint8 [H, W, 3] images")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class WorldOracleScorer:
    """The scorer protocol around ``WorldOracle``: ``scorer(images, prompts) -> Tensor[B]``."""

    name = "world-oracle"

    def __init__(self, model: WorldOracle, tokenizer, path: Path | None = None, device: str = "cpu",
                 batch_size: int = 256):
        self.model, self.tokenizer, self.path = model.to(device).eval(), tokenizer, path
        self.device, self.batch_size = device, batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> WorldOracleScorer:
        from transformers import CLIPTokenizer

        from ..models import world_dir

        path = Path(path) if path is not None else world_dir() / "oracle"
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"no world oracle in {path}; train one with `tandem world train oracle --out DIR` "
                                    "(it lands in DIR/oracle)")
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        return cls(WorldOracle.from_pretrained(path), tokenizer, path, device)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        x = _as_unit_tensor(images)
        prompts = list(prompts)
        if len(prompts) != len(x):
            raise ValueError(f"got {len(x)} images and {len(prompts)} prompts")
        out = []
        for s in range(0, len(x), self.batch_size):
            ids, mask = _tokenize(self.tokenizer, prompts[s:s + self.batch_size])
            out.append(self.model(x[s:s + self.batch_size].to(self.device), ids.to(self.device),
                                  mask.to(self.device)).float().cpu())
        return torch.cat(out)

    def fingerprint(self) -> dict:
        if self.path is None:
            digest = hashlib.sha256(b"".join(v.detach().cpu().float().numpy().tobytes()
                                             for v in self.model.state_dict().values())).hexdigest()
            return {"kind": "world-oracle", "source": None, "weights": "params:" + digest}
        from ..calibration import file_digest

        return {"kind": "world-oracle", "source": str(self.path.resolve()),
                "weights": file_digest(self.path / "model.safetensors")}


# -- training data ----------------------------------------------------------------------------------


def corrupt(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Realistic defects, one per image: pixel noise, a recoloured object, an erased object, an extra blob."""
    out = images.copy()
    for im in out:
        kind = rng.integers(4)
        fg = np.argwhere(im.astype(int).sum(-1) > 60)
        if kind == 0 or len(fg) == 0:
            im[:] = np.clip(im + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8)
        elif kind == 1:
            y, x = fg[rng.integers(len(fg))]
            colour = im[y, x].copy()
            same = (im == colour).all(-1)
            im[same] = rng.integers(0, 256, 3)
        elif kind == 2:
            y, x = fg[rng.integers(len(fg))]
            im[(im == im[y, x]).all(-1)] = 0
        else:
            y, x = rng.integers(2, 28, 2)
            r = rng.integers(2, 5)
            im[max(0, y - r):y + r, max(0, x - r):x + r] = rng.integers(0, 256, 3)
    return out


def generate_samples(prompts: list[str], seed: int, batch_size: int = 100, progress=None) -> dict[str, np.ndarray]:
    """Images of every kind in ``KINDS`` for each prompt (kind -> uint8 [N, 32, 32, 3])."""
    from ..pipeline import TandemPipeline
    from ..presets import PRESETS, load_student, load_teacher

    preset = PRESETS["world"]
    teacher = load_teacher(preset, "cpu", torch.float32)
    pipe = TandemPipeline(load_student(preset, teacher, "cpu", torch.float32), teacher, None, defaults=dict(
        guidance_scale=6.0, teacher_guidance_scale=4.5, teacher_scheduler="dpm"))
    runs = {
        "student1": dict(mode="student", num_inference_steps=1),
        "student2": dict(mode="student", num_inference_steps=2),
        "student4": dict(mode="student", num_inference_steps=4),
        "teacher5": dict(mode="teacher", teacher_steps=5),
        "teacher10": dict(mode="teacher", teacher_steps=10),
        "teacher25": dict(mode="teacher", teacher_steps=25),
        "refined": dict(mode="refine-all", num_inference_steps=4, teacher_steps=10, rollback_sigma=0.5),
    }
    out = {}
    for i, (kind, kwargs) in enumerate(runs.items()):
        out[kind] = np.stack(pipe(prompts, seed=seed + i, batch_size=batch_size, **kwargs).images)
        if progress:
            progress(kind)
    return out


def dataset(prompts: list[str], samples: dict[str, np.ndarray], renders: np.ndarray, seed: int) -> dict:
    """Flatten to arrays: images, prompt index, kind index, soft score and satisfied (the judge's labels)."""
    from .checker import check_batch

    rng = np.random.default_rng(seed)
    samples = {**samples, "render": renders, "corrupt": corrupt(renders, rng)}
    images, prompt_idx, kind_idx, score, satisfied = [], [], [], [], []
    for k, kind in enumerate(KINDS):
        results = check_batch(list(samples[kind]), prompts)
        images.append(samples[kind])
        prompt_idx.append(np.arange(len(prompts)))
        kind_idx.append(np.full(len(prompts), k))
        score.append([r.score for r in results])
        satisfied.append([r.satisfied for r in results])
    return {"images": np.concatenate(images), "prompt": np.concatenate(prompt_idx), "kind": np.concatenate(kind_idx),
            "score": np.concatenate(score).astype(np.float32), "satisfied": np.concatenate(satisfied)}


def build_split(run_dir: Path, name: str, stream_seed: int, n: int) -> tuple[list[str], dict]:
    """Prompts (captions of stream ``stream_seed``), their samples and labels; cached in ``run_dir``."""
    from .stream import sample_batch

    cache = run_dir / f"data_{name}.npz"
    prompts, renders = sample_batch(stream_seed, 0, n)
    if cache.exists():
        data = dict(np.load(cache))
        if len(data["prompt"]) == n * len(KINDS):
            return prompts, data
    samples = generate_samples(prompts, seed=stream_seed)
    data = dataset(prompts, samples, renders, seed=stream_seed)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez_compressed(tmp, **data)
    tmp.replace(cache)
    return prompts, data


# -- training and evaluation --------------------------------------------------------------------------


@dataclass
class OracleTrainConfig:
    arch: OracleArch = field(default_factory=OracleArch)
    seed: int = 7
    n_train: int = 1500           # training prompts (x 9 images each)
    n_eval: int = 300             # held-out prompts
    max_steps: int = 1500
    prompts_per_batch: int = 24   # x 9 images of each prompt
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    rank_weight: float = 1.0      # pairwise logistic loss on same-prompt pairs, beside the regression
    checkpoint_every: int = 250
    threads: int = 2
    clip: str | None = None       # the CLIP to start from [the shipped world's clip/]


def _loss(model, batch_images, ids, mask, target, group, rank_weight) -> tuple[torch.Tensor, dict]:
    pred = model(batch_images, ids, mask)
    mse = F.mse_loss(pred, target)
    same = group[:, None] == group[None, :]
    better = (target[:, None] - target[None, :]) > 1e-6
    pairs = same & better
    rank = F.softplus(-(pred[:, None] - pred[None, :])[pairs] * 5).mean() if pairs.any() else pred.sum() * 0
    return mse + rank_weight * rank, {"mse": mse.item(), "rank": rank.item()}


def pairwise_agreement(pred: np.ndarray, score: np.ndarray, prompt: np.ndarray, kind: np.ndarray,
                       kinds: tuple[int, int] | None = None) -> tuple[float, int]:
    """Share of same-prompt pairs with different judge scores that the oracle orders as the judge does."""
    agree, total = 0, 0
    for p in np.unique(prompt):
        idx = np.flatnonzero(prompt == p)
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if kinds is not None and {kind[i], kind[j]} != set(kinds):
                    continue
                if score[i] == score[j]:
                    continue
                total += 1
                agree += (pred[i] - pred[j]) * (score[i] - score[j]) > 0
    return (agree / total if total else float("nan")), total


def evaluate(scorer: WorldOracleScorer, prompts: list[str], data: dict) -> dict:
    """Agreement of the oracle with the judge on held-out images."""
    from scipy.stats import spearmanr

    pred = scorer(data["images"], [prompts[i] for i in data["prompt"]]).numpy()
    score, prompt, kind, sat = data["score"], data["prompt"], data["kind"], data["satisfied"].astype(bool)
    overall, n_pairs = pairwise_agreement(pred, score, prompt, kind)
    generated = np.isin(kind, [KINDS.index(k) for k in KINDS if k not in ("render", "corrupt")])
    model_only, n_model = pairwise_agreement(pred[generated], score[generated], prompt[generated], kind[generated])
    st, n_st = pairwise_agreement(pred, score, prompt, kind, (KINDS.index("student4"), KINDS.index("teacher25")))
    thresholds = np.unique(pred)
    best_acc = max(float(np.mean((pred >= t) == sat)) for t in thresholds[:: max(1, len(thresholds) // 500)])
    return {
        "n_prompts": len(prompts), "n_images": len(pred),
        "pairwise_agreement": overall, "pairs": n_pairs,
        "pairwise_agreement_generated": model_only, "pairs_generated": n_model,
        "pairwise_agreement_student4_vs_teacher25": st, "pairs_student4_vs_teacher25": n_st,
        "spearman_soft_score": float(spearmanr(pred, score).statistic),
        "satisfied_accuracy_best_threshold": best_acc,
        "satisfied_base_rate": float(sat.mean()),
    }


def train_oracle(out: str | Path, cfg: OracleTrainConfig = OracleTrainConfig(), resume: bool = False) -> Path:
    from transformers import CLIPTokenizer

    from ..models import world_dir
    from .train import _finish, _lr_lambda

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Run(out, "oracle", cfg, resume)
    clip_dir = Path(cfg.clip) if cfg.clip else world_dir() / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(world_dir() / "tokenizer")
    train_prompts, train = build_split(run.dir, "train", TRAIN_SEED, cfg.n_train)
    eval_prompts, held = build_split(run.dir, "eval", EVAL_SEED, cfg.n_eval)
    model = WorldOracle.from_clip(clip_dir, cfg.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.max_steps))
    state = {"oracle": model, "opt": opt, "sched": sched}
    start = run.load(state) if resume else 0
    ids_all, mask_all = _tokenize(tokenizer, train_prompts)
    images_all = torch.from_numpy(train["images"]).permute(0, 3, 1, 2)
    target_all = torch.from_numpy(train["score"])
    by_prompt = [np.flatnonzero(train["prompt"] == p) for p in range(len(train_prompts))]

    def step(i: int) -> dict[str, float]:
        rng = np.random.default_rng([cfg.seed, i])
        chosen = rng.choice(len(train_prompts), cfg.prompts_per_batch, replace=False)
        idx = np.concatenate([by_prompt[p] for p in chosen])
        group = torch.from_numpy(train["prompt"][idx])
        model.train()
        loss, parts = _loss(model, images_all[idx].float() / 255, ids_all[group], mask_all[group],
                            target_all[idx], group, cfg.rank_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), **parts}

    run.loop(start, cfg.max_steps, step, state, cfg.checkpoint_every)
    model.eval()
    target = run.dir / "oracle"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target / "tokenizer")
    scorer = WorldOracleScorer.from_pretrained(target)  # evaluate what was saved (fp16 on disk)
    report = evaluate(scorer, eval_prompts, held)
    report["train_sources"] = {"prompts": f"stream seed {TRAIN_SEED}", "n_prompts": cfg.n_train, "kinds": KINDS}
    atomic_write_text(target / "eval.json", json.dumps(report, indent=2) + "\n")
    _finish(run, target, {"steps": cfg.max_steps, "eval": report})
    return target
