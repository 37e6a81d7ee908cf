"""Training and evaluation of Oracle II (``oracle_net.CompositionalOracle``) on the sharded world data
(``oracle_data``), on the shared Trainer.

The loss on a batch of captions (every image of each): binary cross-entropy of the P(satisfied)
logit against the judge's verdict, squared error of the score head against the judge's soft score,
and ImageReward's pairwise ranking loss on the logit over the images of one caption that the judge
orders. After training, the logit is Platt-scaled on the calibration split (stream 103) and the
oracle is evaluated on the held-out split (stream 102), captions seen in training left out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import world_dir
from ..outputs import atomic_write_text
from ..training.checks import require_number, require_training_fields
from ..training.config import Trainable
from .oracle import MODEL as FIRST_MODEL
from .oracle import WorldOracleScorer, pairwise_agreement, tokenize
from .oracle_data import KINDS, DataRecipe, build_shards, load_shards
from .oracle_net import CompositionalOracle, NetArch, auc, expected_calibration_error, fit_platt

SPLITS = {"train": 101, "eval": 102, "cal": 103}  # stream seeds (the first oracle's train/eval were 101/102 too)


@dataclass
class OracleNetTrainConfig:
    arch: NetArch = field(default_factory=NetArch)
    recipe: DataRecipe = field(default_factory=DataRecipe)
    data: str | None = None          # the shard directory (train/, eval/, cal/) [<out>/data]
    shards: dict = field(default_factory=lambda: {"train": 24, "eval": 2, "cal": 1})
    seed: int = 11
    max_steps: int = 4000
    captions_per_batch: int = 32     # every image of each caption: the ranking pairs are within a caption
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    mse_weight: float = 1.0
    rank_weight: float = 0.5
    rank_sharpness: float = 5.0
    checkpoint_every: int = 250
    threads: int = 1
    world: str | None = None         # whose models draw the data and whose tokenizer it uses [shipped]

    def __post_init__(self):
        require_training_fields(self)
        require_number(self.captions_per_batch, "captions_per_batch", integer=True, at_least=1)
        for name in ("weight_decay", "mse_weight", "rank_weight"):
            require_number(getattr(self, name), name, at_least=0.0)
        require_number(self.rank_sharpness, "rank_sharpness", above=0.0)
        if set(self.shards) != set(SPLITS):
            raise ValueError(f"shards: give a count for each of {sorted(SPLITS)}, got {sorted(self.shards)}")
        for split, n in self.shards.items():
            require_number(n, f"shards[{split}]", integer=True, at_least=1)


class CaptionBatches:
    """Batch ``step``: every image of ``captions_per_batch`` captions drawn by ``default_rng([seed, step])``."""

    def __init__(self, data: dict[str, np.ndarray], tokenizer, captions_per_batch: int, seed: int):
        self.images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()  # uint8
        self.ids, self.mask = tokenize(tokenizer, data["captions"])
        order = np.argsort(data["group"], kind="stable")
        self.members = np.split(order, np.flatnonzero(np.diff(data["group"][order])) + 1)
        self.groups = np.array([int(data["group"][m[0]]) for m in self.members])
        self.score = torch.from_numpy(data["score"]).float()
        self.satisfied = torch.from_numpy(data["satisfied"].astype(np.float32))
        self.n, self.seed = min(captions_per_batch, len(self.members)), seed

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        chosen = np.random.default_rng([self.seed, step]).choice(len(self.members), self.n, replace=False)
        rows = np.concatenate([self.members[c] for c in chosen])
        local = np.concatenate([np.full(len(self.members[c]), j) for j, c in enumerate(chosen)])
        caps = self.groups[chosen]
        return {"images": self.images[rows].float() / 255, "ids": self.ids[caps], "mask": self.mask[caps],
                "group": torch.from_numpy(local), "score": self.score[rows], "satisfied": self.satisfied[rows]}


def net_loss(score, logit, batch, cfg: OracleNetTrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    bce = F.binary_cross_entropy_with_logits(logit, batch["satisfied"])
    mse = F.mse_loss(score, batch["score"])
    group, target = batch["group"], batch["score"]
    pairs = (group[:, None] == group[None, :]) & (target[:, None] > target[None, :])
    rank = F.softplus(-cfg.rank_sharpness * (logit[:, None] - logit[None, :])[pairs]).mean() if pairs.any() \
        else logit.sum() * 0
    loss = bce + cfg.mse_weight * mse + cfg.rank_weight * rank
    return loss, {"bce": bce.detach(), "mse": mse.detach(), "rank": rank.detach()}


class OracleNetTraining:
    """The method on the shared Trainer: one network, ``oracle``; batches from ``batches`` (set once the data is ready)."""

    name = "oracle"
    uses_data = False

    def __init__(self, model: CompositionalOracle, cfg: OracleNetTrainConfig, batches: CaptionBatches | None = None):
        self.model, self.cfg, self.batches = model, cfg, batches

    def trainables(self):
        cfg = self.cfg
        return [Trainable("oracle", self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                          lr_schedule="cosine", grad_clip=1.0)]

    def frozen(self) -> dict:
        return {}

    def step(self, batch, update: str, ctx) -> dict[str, torch.Tensor]:
        if self.batches is None:
            raise RuntimeError("the oracle's training batches are not set (OracleNetTraining.batches)")
        b = self.batches(ctx.batch_index)
        self.model.train()
        text = self.model.encode_text(b["ids"], b["mask"])
        score, logit = self.model.fuse(self.model.image_tokens(b["images"]), text[b["group"]], b["mask"][b["group"]])
        loss, parts = net_loss(score, logit, b, self.cfg)
        return {"loss": loss, **parts}


@torch.no_grad()
def predict(model, tokenizer, data: dict, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(score, logit) of every image of ``data`` (a Compositional oracle)."""
    model.eval()
    ids, mask = tokenize(tokenizer, data["captions"])
    scores, logits = [], []
    for s in range(0, len(data["images"]), batch_size):
        g = torch.from_numpy(data["group"][s:s + batch_size].astype(np.int64))
        x = torch.from_numpy(data["images"][s:s + batch_size]).permute(0, 3, 1, 2).float() / 255
        score, logit = model(x, ids[g], mask[g])
        scores.append(score.numpy())
        logits.append(logit.numpy())
    return np.concatenate(scores), np.concatenate(logits)


def evaluate(pred: np.ndarray, data: dict, keep: np.ndarray | None = None) -> dict:
    """The oracle's predictions ``pred`` (higher: more likely satisfied) against the judge on ``data``; ``keep``
    selects the images that count (e.g. captions unseen in training).

    Reports the AUC of "satisfies its caption" per kind (student4, edit, control, all), pairwise agreement on
    same-caption student4-vs-teacher pairs, and the no-reference decision accuracy (Fig. 7): "keep the student's
    image" iff its prediction is >= tau, against the judge's preference between the student's and teacher's
    images, at tau = each 5th percentile of the student4 predictions (best reported, as `tandem eval oracle` does).
    """
    keep = np.ones(len(pred), bool) if keep is None else keep
    kind, sat, score, group = data["kind"], data["satisfied"].astype(bool), data["score"], data["group"]

    def of(name):
        return keep & (kind == KINDS.index(name))

    report: dict = {"images": int(keep.sum()), "captions": int(len(np.unique(group[keep])))}
    report["auc"] = {name: auc(pred[m], sat[m]) for name in ("student4", "student1", "student2", "teacher", "refined",
                                                              "control", "edit") if (m := of(name)).any()}
    generated = keep & np.isin(kind, [KINDS.index(k) for k in KINDS if not k.startswith(("render", "corrupt"))])
    report["auc"]["generated"] = auc(pred[generated], sat[generated])
    report["auc"]["all"] = auc(pred[keep], sat[keep])
    pair = of("student4") | of("teacher")
    report["pairwise_student4_vs_teacher"], report["pairs_student4_vs_teacher"] = pairwise_agreement(
        pred[pair], score[pair], group[pair], kind[pair], (KINDS.index("student4"), KINDS.index("teacher")))
    s4, te = of("student4"), of("teacher")
    both = np.intersect1d(group[s4], group[te])
    if not len(both):
        report["decision"] = None
        return report
    s_pred, s_judge = _per_group(pred, group, s4, both), _per_group(score, group, s4, both)
    t_judge = _per_group(score, group, te, both)
    decided = s_judge != t_judge
    truth = s_judge[decided] > t_judge[decided]
    rows = [{"k": k, "accuracy": float(np.mean((s_pred[decided] >= np.percentile(pred[s4], k)) == truth))}
            for k in range(0, 101, 5)]
    best = max(rows, key=lambda r: r["accuracy"])
    report["decision"] = {"pairs": int(decided.sum()), "student_better_share": float(truth.mean()),
                          "always_teacher": float(1 - truth.mean()), "best_k": best["k"],
                          "no_reference_best": best["accuracy"], "no_reference": rows}
    return report


def _per_group(values: np.ndarray, group: np.ndarray, mask: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``values`` of the images under ``mask`` (one per group), in the order of ``groups``."""
    idx = np.flatnonzero(mask)
    where = dict(zip(group[idx].tolist(), idx.tolist()))
    return np.array([values[where[int(g)]] for g in groups])


def train_oracle_net(out: str | Path, cfg: OracleNetTrainConfig | None = None, resume: bool = False,
                     log=print) -> Path:
    """Draw the missing shards, train, Platt-scale on ``cal``, export to ``out/oracle`` and evaluate it there
    (``eval.json``, with the world's first oracle, ``oracle-clip/``, beside it on the same images)."""
    from transformers import CLIPTokenizer

    from .train import finish_world_run, open_world_run, world_trainer  # defers diffusers and transformers

    cfg = cfg if cfg is not None else OracleNetTrainConfig()
    world = Path(cfg.world) if cfg.world else world_dir()
    data_dir = Path(cfg.data) if cfg.data else Path(out) / "data"
    keep = ("data",)
    open_world_run(out, cfg, resume, keep)
    tokenizer = CLIPTokenizer.from_pretrained(world / "tokenizer")
    model = CompositionalOracle(tokenizer.vocab_size, tokenizer.model_max_length, cfg.arch)
    method = OracleNetTraining(model, cfg)
    trainer = world_trainer(method, cfg, out, resume, batch_size=cfg.captions_per_batch, log_every=25, keep=keep)
    t0 = time.time()
    data = {split: load_shards(build_shards(data_dir / split, SPLITS[split], cfg.shards[split], cfg.recipe,
                                            cfg.world, log)) for split in SPLITS}
    log(f"oracle data ready in {time.time() - t0:.0f}s: " + ", ".join(
        f"{split} {len(d['images'])} images of {len(d['captions'])} captions" for split, d in data.items()))
    method.batches = CaptionBatches(data["train"], tokenizer, cfg.captions_per_batch, cfg.seed)
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    model.eval()
    _, cal_logit = predict(model, tokenizer, data["cal"])
    a, b = fit_platt(cal_logit, data["cal"]["satisfied"])
    model.platt.copy_(torch.tensor([a, b]))
    target = trainer.dir / "oracle"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target / "tokenizer")
    first = [d for d in (world / "oracle-clip", world / "oracle") if (d / "config.json").is_file()
             and json.loads((d / "config.json").read_text()).get("model") == FIRST_MODEL]
    report = evaluate_export(target, data, first[0] if first else None)
    report["platt"] = {"a": a, "b": b, "fitted_on": f"cal split (stream {SPLITS['cal']})"}
    report["seconds"] = {"training_this_call": round(train_seconds)}
    atomic_write_text(target / "eval.json", json.dumps(report, indent=2) + "\n")
    finish_world_run(trainer, cfg, [target], {"steps": cfg.max_steps, "eval": _headline(report)})
    log("oracle eval (held-out captions): " + json.dumps(_headline(report)))
    return target


def evaluate_export(target: Path, data: dict, baseline: Path | None = None) -> dict:
    """The saved oracle (fp16 weights, as shipped) on the held-out split, and beside it the oracle in ``baseline``
    (a first world oracle, ``oracle.WorldOracle``) on the same images."""
    from transformers import CLIPTokenizer

    model = CompositionalOracle.from_pretrained(target)
    tokenizer = CLIPTokenizer.from_pretrained(target / "tokenizer")
    held, seen = data["eval"], set(data["train"]["captions"].tolist())
    unseen = np.array([c not in seen for c in held["captions"]])[held["group"]]
    _, logit = predict(model, tokenizer, held)
    p = model.p_satisfied(torch.from_numpy(logit)).numpy()
    sat = held["satisfied"]
    report = {"held_out": {"stream_seed": SPLITS["eval"], "captions_seen_in_training_dropped":
                           int(len(held["captions"]) - len(np.unique(held["group"][unseen])))},
              "oracle_ii": evaluate(p, held, unseen),
              "calibration": {"ece_raw_sigmoid": expected_calibration_error(1 / (1 + np.exp(-logit[unseen])),
                                                                            sat[unseen]),
                              "ece_platt": expected_calibration_error(p[unseen], sat[unseen])}}
    if baseline is not None:
        old = WorldOracleScorer.from_pretrained(baseline)
        caps = held["captions"][held["group"]].tolist()
        report["first_oracle"] = {"path": str(baseline), **evaluate(old(held["images"], caps).numpy(), held, unseen)}
    return report


def _headline(report: dict) -> dict:
    o = report["oracle_ii"]
    return {"auc_student4": o["auc"]["student4"], "auc_edit": o["auc"].get("edit"),
            "auc_control": o["auc"].get("control"), "pairwise_student4_vs_teacher": o["pairwise_student4_vs_teacher"],
            "decision_no_reference_best": o["decision"]["no_reference_best"],
            "ece_platt": report["calibration"]["ece_platt"]}
