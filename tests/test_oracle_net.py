"""Oracle II against independent references: its corruptions break captions as the exact checker says,
its shards hold the checker's labels and rebuild bit for bit, its AUC / Platt scaling / ECE match
closed forms and brute force, its scorer is batch-independent and calibrated, and its training runs
on the shared Trainer and learns to tell renderings from near misses on held-out captions."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tandem.world.checker import check, check_batch
from tandem.world.oracle import WorldOracleScorer
from tandem.world.oracle_data import (
    CORRUPTIONS,
    KINDS,
    DataRecipe,
    build_shards,
    corrupt_scene,
    load_shards,
)
from tandem.world.oracle_net import CompositionalOracle, NetArch, auc, expected_calibration_error, fit_platt
from tandem.world.oracle_train import (
    SPLITS,
    CaptionBatches,
    OracleNetTrainConfig,
    evaluate,
    train_oracle_net,
)
from tandem.world.scene import render, sample_scene

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DataRecipe(shard_prompts=12, teacher_steps=(2,), refine_sigmas=(0.5,), refine_teacher_steps=2,
                  control=("mask",), corruptions=2, edits_per_shard=4, edit_strengths=(0.6,))
ARCH = NetArch(channels=(16, 32), width=32, heads=2, fusion_layers=1)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from tandem.models import world_dir

    return CLIPTokenizer.from_pretrained(world_dir() / "tokenizer")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny shards of the three splits, drawn by the shipped world."""
    root = tmp_path_factory.mktemp("oracle-data")
    torch.set_num_threads(1)
    for split, n in (("train", 2), ("eval", 1), ("cal", 1)):
        build_shards(root / split, SPLITS[split], n, TINY)
    return root


def test_targeted_corruptions_break_what_the_caption_promises():
    """A dropped or an extra object always fails the caption, and so does a changed shape; a changed colour
    wherever the caption states every colour (the checker decides, independently of the corruption code)."""
    seen = set()
    for i in range(300):
        scene = sample_scene((555, i))
        for what in CORRUPTIONS:
            changed = corrupt_scene(scene, what, np.random.default_rng([i, len(what)]))
            if changed is None:  # does not apply (one object to drop or swap), or the objects would touch
                assert what not in ("drop", "swap") or len(scene.objects) == 1 or what == "swap"
                continue
            seen.add(what)
            image = render(changed)
            assert not np.array_equal(image, render(scene)) or what == "swap"
            verdict = check(image, scene.caption).satisfied
            if what in ("drop", "extra"):
                assert not verdict, (what, scene.caption)
            if what == "shape":
                assert not verdict, (what, scene.caption)
            if what == "color" and all(o.says_color for o in scene.objects):
                assert not verdict, (what, scene.caption)
    assert seen == set(CORRUPTIONS)


def test_shards_hold_the_checkers_labels_and_rebuild_bit_for_bit(shards, tmp_path):
    data = load_shards(sorted((shards / "train").glob("shard-*.npz")))
    results = check_batch(list(data["images"]), [str(c) for c in data["captions"][data["group"]]])
    assert np.array_equal(data["satisfied"], [r.satisfied for r in results])
    assert np.allclose(data["score"], [r.score for r in results])
    kinds = {KINDS[k] for k in np.unique(data["kind"])}
    assert {"student1", "student2", "student4", "teacher", "refined", "control", "render", "edit"} <= kinds
    assert any(k.startswith("corrupt-") for k in kinds)
    render_rows = data["kind"] == KINDS.index("render")
    assert data["satisfied"][render_rows].all()  # every rendering satisfies its own caption
    assert data["group"].max() + 1 == len(data["captions"])
    # resuming: a missing shard is drawn again, identically; another recipe in the directory is refused
    again = tmp_path / "train"
    again.mkdir()
    for f in (shards / "train").iterdir():
        (again / f.name).write_bytes(f.read_bytes())
    (again / "shard-00001.npz").unlink()
    build_shards(again, SPLITS["train"], 2, TINY)
    a, b = (np.load(d / "shard-00001.npz") for d in (shards / "train", again))
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    with pytest.raises(ValueError, match="another recipe"):
        build_shards(again, SPLITS["train"], 2, dataclasses.replace(TINY, corruptions=1))


def test_auc_counts_pairs_and_halves_ties():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, 60).astype(float)  # many ties
    label = rng.random(60) < 0.4
    pos, neg = pred[label], pred[~label]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(pred, label) == pytest.approx(brute)
    assert auc(np.arange(4.0), np.array([0, 0, 1, 1], bool)) == 1.0
    assert np.isnan(auc(np.arange(3.0), np.ones(3, bool)))


def test_platt_scaling_recovers_a_known_calibration_and_ece_is_the_binned_gap():
    rng = np.random.default_rng(1)
    logit = rng.normal(0, 2, 20000)
    label = rng.random(20000) < 1 / (1 + np.exp(-(2 * logit - 1)))
    a, b = fit_platt(logit, label)
    assert a == pytest.approx(2, abs=0.1) and b == pytest.approx(-1, abs=0.1)
    # bins [0.1, 0.2) and [0.9, 1.0]: |0.1 - 1/2| * 2 and |0.9 - 1| * 2 over 4 images
    assert expected_calibration_error(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1])) == pytest.approx(0.25)


def test_decision_accuracy_by_hand():
    """Three captions with a student4 and a teacher image each: the judge prefers the student in caption 0
    only; caption 2 is a judge tie (not counted)."""
    kind = np.array([KINDS.index(k) for k in ("student4", "teacher") * 3])
    data = {"kind": kind, "group": np.repeat(np.arange(3), 2), "captions": np.array(["a", "b", "c"]),
            "score": np.array([0.9, 0.5, 0.4, 0.8, 0.6, 0.6]), "satisfied": np.array([1, 0, 0, 1, 0, 0], bool)}
    pred = np.array([0.8, 0.1, 0.3, 0.9, 0.5, 0.5])  # student4 predictions 0.8, 0.3, 0.5
    report = evaluate(pred, data)
    assert report["decision"]["pairs"] == 2 and report["decision"]["student_better_share"] == 0.5
    # keep the student iff its prediction >= tau: tau between 0.3 and 0.8 gets both right
    assert report["decision"]["no_reference_best"] == 1.0
    assert report["pairwise_student4_vs_teacher"] == 1.0 and report["pairs_student4_vs_teacher"] == 2
    assert report["auc"]["student4"] == 1.0


def test_batches_carry_every_image_of_their_captions(shards, tokenizer):
    data = load_shards(sorted((shards / "train").glob("shard-*.npz")))
    batches = CaptionBatches(data, tokenizer, 5, seed=3)
    a, b = batches(7), batches(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = tokenizer(list(data["captions"]), padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    for j in range(5):
        rows = a["group"] == j
        caption = int(np.flatnonzero((ids == a["ids"][j]).all(1))[0])
        assert rows.sum() == (data["group"] == caption).sum()
        assert torch.equal(a["score"][rows], torch.from_numpy(data["score"][data["group"] == caption]))


def test_saved_oracle_scores_calibrated_probabilities_independent_of_the_batch(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = CompositionalOracle(tokenizer.vocab_size, tokenizer.model_max_length, ARCH, platt=(1.7, -0.3))
    model.save_pretrained(tmp_path / "o")
    tokenizer.save_pretrained(tmp_path / "o" / "tokenizer")
    scorer = WorldOracleScorer.from_pretrained(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["platt"] == pytest.approx([1.7, -0.3])
    images = torch.rand(5, 3, 32, 32)
    prompts = ["a red circle", "a blue square at the top", "a small green triangle", "a white circle",
               "a red square and a blue circle"]
    together = scorer(images, prompts)
    alone = torch.cat([scorer(images[i:i + 1], prompts[i:i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-6)
    assert ((together > 0) & (together < 1)).all()
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    _, logit = scorer.model(images, ids.input_ids, ids.attention_mask)
    assert torch.allclose(together, torch.sigmoid(1.7 * logit - 0.3), atol=1e-6)


def test_palette_channels_are_the_softmax_over_colours_of_minus_squared_distance(tokenizer):
    """The encoder's palette channels against the formula written out directly; nothing subnormal reaches the
    convolutions (subnormal floats make them twice as slow on a CPU)."""
    model = CompositionalOracle(tokenizer.vocab_size, tokenizer.model_max_length, ARCH)
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    images = torch.rand(4, 3, 32, 32)
    images[0] = model.colors[3][:, None, None]  # a pixel exactly on a palette colour
    model.image_tokens(images)
    handle.remove()
    d2 = ((images[:, None] - model.colors[None, :, :, None, None]) ** 2).sum(2)
    direct = torch.softmax(-d2 / 0.01, 1)
    palette = seen[0][:, 3:3 + len(model.colors)]
    assert torch.allclose(palette, direct, atol=1e-5)
    assert torch.allclose(palette[0, 3], torch.ones(32, 32), atol=1e-6)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((seen[0] != 0) & (seen[0].abs() < tiny)).any()


def test_cli_sets_the_oracles_encoder_channels_and_width(tmp_path, capsys, monkeypatch):
    from clitools import tandem_in_process

    from tandem.world import oracle_train

    given = []
    monkeypatch.setattr(oracle_train, "train_oracle_net", lambda out, cfg, resume: given.append(cfg) or out)
    result = tandem_in_process(capsys, monkeypatch, "world", "train", "oracle", "--channels", "24,48", "--width", "48",
                               "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert given[0].arch == NetArch(channels=(24, 48), width=48)


def test_training_fits_its_data_on_the_trainer_and_reports_both_oracles(shards, tmp_path):
    """A short run learns its training captions' renderings from their near misses (held-out quality needs the
    real data: docs/results/oracle2); its report holds the first oracle on the same held-out images."""
    cfg = OracleNetTrainConfig(arch=ARCH, recipe=TINY, data=str(shards), shards={"train": 2, "eval": 1, "cal": 1},
                               max_steps=200, captions_per_batch=8, lr=5e-3, warmup_steps=10, checkpoint_every=50)
    target = train_oracle_net(tmp_path / "run", cfg)
    report = json.loads((target / "eval.json").read_text())
    assert {"student4", "edit", "control", "all"} <= set(report["oracle_ii"]["auc"])
    assert report["first_oracle"]["images"] == report["oracle_ii"]["images"]
    scorer = WorldOracleScorer.from_pretrained(target)
    seen = load_shards(sorted((shards / "train").glob("shard-*.npz")))
    exact = np.isin(seen["kind"], [KINDS.index(k) for k in KINDS if k == "render" or k.startswith("corrupt")])
    p = scorer(seen["images"][exact], [str(c) for c in seen["captions"][seen["group"][exact]]]).numpy()
    assert auc(p, seen["satisfied"][exact]) > 0.75  # 0.82 when written
    with pytest.raises(ValueError, match="another recipe"):  # a run on shards of another recipe is refused
        train_oracle_net(tmp_path / "run2", dataclasses.replace(cfg, recipe=dataclasses.replace(TINY, corruptions=1)))


def test_the_shipped_oracle_ii_tells_renderings_from_near_misses_and_beats_the_first():
    """Held-out scenes (a seed family no oracle data uses): the shipped Oracle II's calibrated P(satisfied) ranks
    renderings above their targeted corruptions (the checker labels them) better than the first oracle does,
    and its report on the held-out split beats the first oracle's on the same images."""
    from tandem.models import world_dir

    scorer = WorldOracleScorer.from_pretrained()
    assert json.loads((world_dir() / "oracle" / "config.json").read_text())["model"].endswith("CompositionalOracle")
    images, captions, labels = [], [], []
    for i in range(150):
        scene = sample_scene((777, i))
        for image in [render(scene)] + [render(c) for what in CORRUPTIONS
                                         if (c := corrupt_scene(scene, what, np.random.default_rng([777, i]))) is not None]:
            images.append(image)
            captions.append(scene.caption)
            labels.append(check(image, scene.caption).satisfied)
    p = scorer(np.stack(images), captions).numpy()
    first = WorldOracleScorer.from_pretrained(world_dir() / "oracle-clip")(np.stack(images), captions).numpy()
    assert ((p > 0) & (p < 1)).all()
    assert auc(p, np.array(labels)) > max(0.75, auc(first, np.array(labels)))  # 0.79 and 0.73 when shipped
    report = json.loads((world_dir() / "oracle" / "eval.json").read_text())
    new, old = report["oracle_ii"], report["first_oracle"]
    assert new["images"] == old["images"] and new["auc"]["student4"] > old["auc"]["student4"] + 0.1
