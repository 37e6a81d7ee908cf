"""Evaluation: metrics against hand-computed and closed-form values; the adaptive results composed
from cached runs against a real adaptive run; resume; the `tandem eval` commands."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from clitools import assert_user_error, ok, tandem_in_process
from worldtools import PROMPTS, world_pipeline

from tandem.calibration import Calibration
from tandem.eval.metrics import decision_accuracy, synthetic_oracle, win_rate
from tandem.eval.sweep import SamplerConfig, Sweep, compose_adaptive
from tandem.models import world_dir
from tandem.presets import world_calibration_path
from tandem.world.checker import check_batch


def test_win_rate_splits_ties_and_its_interval_shrinks_with_n():
    a, b = np.array([1.0, 0.5, 0.2, 0.7]), np.array([0.5, 0.5, 0.9, 0.1])
    r = win_rate(a, b)
    assert (r["win"], r["tie"], r["loss"], r["win_rate"]) == (0.5, 0.25, 0.25, 0.625)
    rng = np.random.default_rng(0)
    small = win_rate(rng.random(50), rng.random(50), resamples=4000)
    big_a, big_b = rng.random(2000), rng.random(2000)
    big = win_rate(big_a, big_b, resamples=4000)
    assert small["ci"][0] < small["win_rate"] < small["ci"][1]
    # a binomial proportion near 1/2: the 95% interval is about +-1.96 sqrt(p (1 - p) / n)
    half = 1.96 * np.sqrt(big["win_rate"] * (1 - big["win_rate"]) / 2000)
    assert big["ci"][1] - big["ci"][0] == pytest.approx(2 * half, rel=0.15)
    with pytest.raises(ValueError, match="equally long"):
        win_rate(a, b[:3])


def test_decision_accuracy_by_hand():
    student_oracle = np.array([0.9, 0.2, 0.6, 0.4, 0.5])
    teacher_oracle = np.array([0.1, 0.8, 0.7, 0.3, 0.5])
    student_judge = np.array([1.0, 0.0, 0.5, 1.0, 0.3])
    teacher_judge = np.array([0.5, 1.0, 0.4, 0.0, 0.3])  # the last prompt: a judge tie, left out
    d = decision_accuracy(student_oracle, teacher_oracle, student_judge, teacher_judge, {50: 0.5})
    # truth (student better): T F T T; full reference (0.9>0.1, 0.2>0.8, 0.6>0.7, 0.4>0.3): T F F T -> 3/4
    assert d["pairs"] == 4 and d["full_reference"] == 0.75 and d["student_better_share"] == 0.75
    # no reference at tau 0.5 (score >= 0.5): T F T F -> 3/4
    assert d["no_reference"] == [{"k": 50.0, "tau": 0.5, "accuracy": 0.75}]
    # the ceiling: the judge's student scores 1, 0, 0.5, 1 cut at 0.5 give T F T T, all four right
    assert d["no_reference_ceiling"] == {"tau": 0.5, "accuracy": 1.0}


def test_a_perfect_synthetic_oracle_keeps_the_better_image_and_a_wrong_one_the_worse():
    s, t = np.array([0.2, 0.9, 0.5, 0.4]), np.array([0.6, 0.3, 0.5, 0.1])
    best, worst = np.maximum(s, t).mean(), np.minimum(s, t).mean()
    assert synthetic_oracle(s, t, 1.0)["mean_score"] == pytest.approx(best)
    assert synthetic_oracle(s, t, 0.0)["mean_score"] == pytest.approx(worst)
    assert worst < synthetic_oracle(s, t, 0.7, seeds=200)["mean_score"] < best
    with pytest.raises(ValueError, match="oracle accuracy"):
        synthetic_oracle(s, t, 1.5)


@pytest.fixture(scope="module")
def pipe():
    return world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_guidance_scale=4.5, rollback_sigma=0.6)


@pytest.mark.parametrize("strategy", ["regenerate", "refine"])
def test_composed_adaptive_results_equal_a_real_adaptive_run(pipe, strategy, tmp_path):
    sweep = Sweep(pipe, PROMPTS, 3, tmp_path / "cache", batch_size=len(PROMPTS))
    student = sweep.run(SamplerConfig("student", 2))
    improved = sweep.run(SamplerConfig("teacher", 4) if strategy == "regenerate"
                         else SamplerConfig("refine-all", 4, "dpm", 0.6))
    tau = float(np.median(student["oracle"]))
    composed = compose_adaptive(student, improved, tau, improved_includes_student=strategy == "refine")
    real = pipe(PROMPTS, seed=3, accept_threshold=tau, strategy=strategy, teacher_steps=4)
    judged = check_batch(real.images, PROMPTS)
    assert list(composed["rejected"]) == [r["path"] != "accepted" for r in real.records]
    assert 0 < composed["rejected"].sum() < len(PROMPTS)
    np.testing.assert_array_equal(composed["evals"], [r["unet_evals"]["total"] for r in real.records])
    # the same images up to the float rounding of other batch compositions (a rare 8-bit flip)
    np.testing.assert_allclose(composed["score"], [r.score for r in judged], atol=0.02)


class Counting:
    """``pipe`` that notes the mode of each call in ``calls``."""

    def __init__(self, pipe, calls: list):
        self.pipe, self.calls = pipe, calls

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs["mode"])
        return self.pipe(*args, **kwargs)


def test_a_sweep_resumes_from_its_cache_and_refuses_other_prompts(pipe, tmp_path):
    calls = []
    first = Sweep(Counting(pipe, calls), PROMPTS[:3], 0, tmp_path).run(SamplerConfig("student", 1))
    again = Sweep(Counting(pipe, calls), PROMPTS[:3], 0, tmp_path).run(SamplerConfig("student", 1))
    assert calls == ["student"]
    for key in ("satisfied", "score", "oracle", "evals"):
        np.testing.assert_array_equal(first[key], again[key])
    with pytest.raises(ValueError, match="other prompts or settings"):
        Sweep(pipe, PROMPTS[:2], 0, tmp_path)
    with pytest.raises(ValueError, match="rollback sigma"):
        SamplerConfig("teacher", 4, rollback_sigma=0.5)


class Redness:
    """Another stand-in oracle: the mean red value."""

    def __call__(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2))

    def fingerprint(self):
        return {"kind": "redness"}


def test_a_sweep_takes_another_oracles_images_and_scores_them_with_its_own(pipe, tmp_path):
    source = Sweep(pipe, PROMPTS[:3], 0, tmp_path / "a")
    drawn = {c.name: source.run(c) for c in (SamplerConfig("student", 1), SamplerConfig("teacher", 2))}
    own = pipe.scorer
    pipe.scorer = Redness()
    try:
        calls = []
        sweep = Sweep(Counting(pipe, calls), PROMPTS[:3], 0, tmp_path / "b", images_from=tmp_path / "a")
        for name, config in (("student1", SamplerConfig("student", 1)), ("dpm2", SamplerConfig("teacher", 2))):
            again = sweep.run(config)
            for key in ("images", "satisfied", "score", "evals"):
                np.testing.assert_array_equal(again[key], drawn[name][key])
            red = drawn[name]["images"][..., 0].reshape(3, -1).mean(1) / 255
            np.testing.assert_allclose(again["oracle"], red, atol=1e-6)
            assert not np.allclose(again["oracle"], drawn[name]["oracle"])
        assert calls == []  # nothing drawn again
        sweep.run(SamplerConfig("student", 2))  # not in the source: drawn
        assert calls == ["student"]
        with pytest.raises(ValueError, match=r"\(n: saved 3, requested 2\); only the oracle may differ"):
            Sweep(pipe, PROMPTS[:2], 0, tmp_path / "c", images_from=tmp_path / "a")
        assert not (tmp_path / "c").exists()  # refused before writing: the corrected run may use the same place
        Sweep(pipe, PROMPTS[:3], 0, tmp_path / "c", images_from=tmp_path / "a")
        with pytest.raises(ValueError, match=r"\(n: saved 3, requested 2\); choose another out=\.\.\."):
            Sweep(pipe, PROMPTS[:2], 0, tmp_path / "c")  # names the key that differs, not the whole identity
    finally:
        pipe.scorer = own


def test_eval_oracle_command_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "oracle"
    args = ("eval", "oracle", "--prompts", "val", "--n", 6, "--batch-size", 6, "--out", out)
    ok(tandem_in_process(capsys, monkeypatch, *args))
    results = json.loads((out / "results.json").read_text())
    assert results["made_by"]["n"] == 6 and results["config"]["teacher_steps"] == 25
    shipped = world_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    assert results["models"]["teacher"] == "sha256:" + hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert results["pipeline_defaults"]["teacher_guidance_scale"] == json.loads(
        (world_dir() / "tandem.json").read_text())["teacher"]["guidance_scale"]
    assert len(results["decisions"]["no_reference"]) == len(results["config"]["ks"])
    assert (out / "oracle.png").stat().st_size > 0 and "Oracle accuracy" in (out / "report.md").read_text()
    calibration = Calibration.load(world_calibration_path())
    assert results["decisions"]["no_reference"][10]["tau"] == pytest.approx(calibration.threshold(50))
    assert_user_error(tandem_in_process(capsys, monkeypatch, *args), "--resume")
    cached = sorted(p.name for p in (out / "cache").iterdir())
    ok(tandem_in_process(capsys, monkeypatch, *args, "--resume"))
    assert sorted(p.name for p in (out / "cache").iterdir()) == cached
    # the same run's images taken again (an oracle compared on them would be re-scored the same way)
    again = tmp_path / "again"
    ok(tandem_in_process(capsys, monkeypatch, *args[:-1], again, "--images-from", out))
    assert sorted(p.name for p in (again / "cache").iterdir()) == cached
    assert json.loads((again / "results.json").read_text())["decisions"] == results["decisions"]
    assert_user_error(tandem_in_process(capsys, monkeypatch, *args[:-1], tmp_path / "z", "--images-from", tmp_path),
                      "--images-from", "cache/identity.json")
    # refused for other prompts: nothing is left in --out, so the corrected run needs no --resume
    fewer = ("eval", "oracle", "--prompts", "val", "--n", 5, "--batch-size", 6)
    refused = tmp_path / "refused"
    assert tandem_in_process(capsys, monkeypatch, *fewer, "--out", refused, "--images-from", out).returncode == 2
    assert not refused.exists() or not any(refused.iterdir())
    ok(tandem_in_process(capsys, monkeypatch, *args[:-1], refused, "--images-from", out))
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "threshold", "--images-from", out,
                                        "--out", tmp_path / "t"), "--images-from", "eval budget")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", "--model", "sd15-lcm",
                                        "--out", tmp_path / "x"), "ShapesWorld list")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", "--n", 0, "--out", tmp_path / "y"),
                      "--n")


def test_trajectory_curvature_is_the_distance_from_the_chord():
    from tandem.eval.winners import trajectory_curvature

    start, end = torch.zeros(1, 2), torch.tensor([[4.0, 0.0]])
    on_line = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])
    off_line = torch.tensor([[[1.0, 0.5]], [[2.0, -2.0]], [[6.0, 1.0]]])  # distances 0.5, 2, 1 from the x axis
    assert trajectory_curvature(start, end, on_line).item() == 0
    assert trajectory_curvature(start, end, off_line).item() == pytest.approx(2.0)


def test_edge_density_counts_the_outline_of_a_square():
    from tandem.eval.winners import edge_density

    image = np.zeros((1, 32, 32, 3), np.uint8)
    assert edge_density(image)[0] == 0
    image[0, 8:24, 8:24] = 255  # a 16x16 white square: its gradient lives on a 2-pixel band each side of the edge
    inner, outer = 14 * 14, 18 * 18
    assert edge_density(image)[0] == pytest.approx((outer - inner - 4) / 1024, abs=8 / 1024)


def test_by_bins_groups_and_scores_each_bin():
    from tandem.eval.winners import by_bins

    values = np.array([1, 1, 2, 2, 3, 3])
    student, teacher = np.array([1.0, 0, 1, 1, 0, 0.5]), np.array([0.0, 1, 0, 0, 1, 0.5])
    rows = by_bins(values, student, teacher, None, {"v": values.astype(float)})
    assert [(r["low"], r["n"], r["win_rate"], r["mean_v"]) for r in rows] == [(1, 2, 0.5, 1.0), (2, 2, 1.0, 2.0),
                                                                             (3, 2, 0.25, 3.0)]


def test_the_recorded_teacher_draws_the_same_images_as_the_pipeline(pipe, tmp_path):
    from tandem.eval.winners import teacher_with_curvature

    images, curvature = teacher_with_curvature(pipe, PROMPTS, 3, 4, 4.5, batch_size=len(PROMPTS))
    reference = Sweep(pipe, PROMPTS, 3, tmp_path, batch_size=len(PROMPTS)).run(SamplerConfig("teacher", 4))
    assert np.abs(images.astype(int) - reference["images"].astype(int)).max() <= 1
    assert curvature.shape == (len(PROMPTS),) and (curvature > 0).all()


def test_eval_winners_and_threshold_commands(tmp_path, capsys, monkeypatch):
    common = ("--prompts", "val", "--batch-size", 30)
    ok(tandem_in_process(capsys, monkeypatch, "eval", "winners", *common, "--n", 6, "--out", tmp_path / "w"))
    winners = json.loads((tmp_path / "w" / "results.json").read_text())
    assert sum(r["n"] for r in winners["by_objects"]) == 6 and winners["student_vs_teacher"]["n"] == 6
    assert sum(r["n"] for r in winners["by_text_influence"]) == 6
    assert all(0 < r["low"] <= r["high"] <= 1 for r in winners["by_text_influence"])
    assert (tmp_path / "w" / "winners.png").exists()
    ok(tandem_in_process(capsys, monkeypatch, "eval", "threshold", *common, "--n", 30, "--out", tmp_path / "t"))
    threshold = json.loads((tmp_path / "t" / "results.json").read_text())
    assert [r["n"] for r in threshold["rows"]] == [25, 25, 25]  # the sizes below 30 prompts, for k = 30, 50, 70
    assert "Threshold convergence" in (tmp_path / "t" / "report.md").read_text()
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "threshold", *common, "--n", 10, "--out",
                                        tmp_path / "t2"), "more prompts")


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    from tandem.eval.features import frechet_distance

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20000, 3))
    y = rng.normal([1, 0, 2], [1, 2, 0.5], (20000, 3))
    # N(mu1, diag s1^2) vs N(mu2, diag s2^2): |mu1 - mu2|^2 + sum (s1 - s2)^2 = 5 + (0 + 1 + 0.25)
    assert frechet_distance(x, y) == pytest.approx(6.25, rel=0.03)
    assert abs(frechet_distance(x, x)) < 1e-6
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(x, y[:, :2])


def test_diversity_is_zero_for_copies_and_one_for_orthogonal_images():
    from tandem.eval.features import diversity

    same = np.tile(np.array([1.0, 0, 0]), (4, 3, 1))
    assert diversity(same) == pytest.approx(0)
    assert diversity(np.eye(3)[None]) == pytest.approx(1)
    with pytest.raises(ValueError, match="seeds >= 2"):
        diversity(same[:, :1])


def test_world_features_and_clip_score_tell_renderings_apart():
    """Independent truth: exact renderings. Two renderings of the same prompts are closer in distribution
    than renderings and noise; a rendering matches its own caption better than a shuffled one."""
    from tandem.eval.features import ImageFeatures, frechet_distance, renderings, world_clip_score
    from tandem.world.prompts import load_prompts

    prompts = load_prompts("val")[:200]
    a, b = renderings(prompts, 0), renderings(prompts, 1)
    noise = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
    features = ImageFeatures.world()
    fa, fb, fn = features(a), features(b), features(noise)
    assert np.allclose(np.linalg.norm(fa, axis=1), 1)
    assert frechet_distance(fa, fb) < 0.2 * frechet_distance(fa, fn)
    own = world_clip_score(a, prompts)
    shuffled = world_clip_score(a, prompts[1:] + prompts[:1])
    assert (own > shuffled).mean() > 0.8


def test_image_features_load_a_local_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from tandem.eval.features import ImageFeatures

    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 100},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    f = ImageFeatures.from_pretrained(str(tmp_path / "clip"))
    out = f(np.zeros((3, 64, 64, 3), np.uint8))
    assert out.shape == (3, 8) and np.allclose(np.linalg.norm(out, axis=1), 1)


def test_image_features_load_a_local_dinov2_and_measure_preservation(tmp_path):
    import json

    import torch
    from transformers import Dinov2Config, Dinov2Model

    from tandem.eval.features import ImageFeatures, preservation

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8))
    model.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    f = ImageFeatures.from_pretrained(str(tmp_path / "dino"))
    assert f.dino and f.image_size == 32
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected = torch.nn.functional.normalize(model(pixel_values=(x - 0.5) / 0.5).pooler_output, dim=-1)
    np.testing.assert_allclose(f(images), expected.detach().double().numpy(), atol=1e-5)
    same = preservation(images, images, f)
    np.testing.assert_allclose(same, 1.0, atol=1e-6)
    assert (preservation(images, images[::-1], f)[[0, 3]] < 1 - 1e-4).all()


def test_combined_report_embeds_every_experiment(tmp_path, capsys, monkeypatch):
    import base64
    import json

    from PIL import Image

    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(d / "plot.png")
        (d / "results.json").write_text(json.dumps({"experiment": name, "made_by": {"command": f"eval {name}"}}))
        (d / "report.md").write_text(f"# Experiment {name}\n\nsome `code` and **bold**\n\n| x | y |\n|---|---|\n"
                                     f"| 1 | {name}2 |\n\n- first\n  continued\n- second\n\n![plot](plot.png)\n")
    out = tmp_path / "report.html"
    ok(tandem_in_process(capsys, monkeypatch, "eval", "report", tmp_path / "a", tmp_path / "b", "--out", out))
    page = out.read_text()
    png = base64.b64encode((tmp_path / "a" / "plot.png").read_bytes()).decode()
    assert page.count(f"data:image/png;base64,{png}") == 2
    assert "<td>a2</td>" in page and "<td>b2</td>" in page and "<th>x</th>" in page
    assert "<li>first continued</li>" in page and "<code>code</code>" in page and "<b>bold</b>" in page
    assert "eval b" in page  # the configuration behind each section
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "report", tmp_path / "a", "--out", out),
                      "exists")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "report", tmp_path, "--out",
                                        tmp_path / "x.html"), "not a finished")


def test_diversity_is_zero_over_repeated_seeds_and_positive_over_distinct_ones(tmp_path):
    from tandem.eval.experiments import DiversityConfig, diversity

    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_guidance_scale=4.5)
    pipe.calibration = pipe.calibrate(PROMPTS, seed=9)
    small = dict(teacher_steps=(2,), refine_steps=2, k=50)
    same = diversity(pipe, PROMPTS[:3], tmp_path / "same", cfg=DiversityConfig(seeds=(0, 0), **small), log=str)
    assert {r["run"] for r in same["rows"]} == {"student", "dpm2", "refine-all", "adaptive refine k=50",
                                                "adaptive regenerate dpm2 k=50"}
    assert all(abs(r["diversity"]) < 1e-6 for r in same["rows"])  # a seed repeated draws the same images
    distinct = diversity(pipe, PROMPTS[:3], tmp_path / "distinct", cfg=DiversityConfig(seeds=(0, 1), **small),
                         log=str)
    assert all(r["diversity"] > 1e-4 for r in distinct["rows"])
    assert (tmp_path / "distinct" / "diversity.png").exists()


def test_student_cross_attention_is_a_distribution_over_tokens_and_leaves_the_student_unchanged(pipe):
    from tandem.eval.winners import student_cross_attention, student_text_influence

    before = pipe(PROMPTS[:3], mode="student", seed=3, score=False).images
    processors = {name: type(p) for name, p in pipe.student.unet.attn_processors.items()}
    per_token = student_cross_attention(pipe, PROMPTS[:3], 3, 2, batch_size=2)
    assert per_token.shape == (3, pipe.student.tokenizer.model_max_length)
    np.testing.assert_allclose(per_token.sum(1), 1, atol=1e-5)  # softmax over tokens, averaged
    influence = student_text_influence(pipe, PROMPTS[:3], 3, 2, batch_size=2)
    for row, prompt, value in zip(per_token, PROMPTS, influence):
        n = len(pipe.student.tokenizer(prompt).input_ids)
        assert value == pytest.approx(row[1:n - 1].max())  # the prompt's own tokens only
    assert {name: type(p) for name, p in pipe.student.unet.attn_processors.items()} == processors
    after = pipe(PROMPTS[:3], mode="student", seed=3, score=False).images
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
