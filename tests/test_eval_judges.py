"""Real-tier evaluation: a learned scorer as the judge, a feature network and reference images as
given, on the same code path as the world's exact checker (run here on the shipped world's models)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from clitools import assert_user_error, ok, tandem_in_process
from PIL import Image
from worldtools import PROMPTS, world_pipeline

from tandem.eval.experiments import BudgetConfig, OracleConfig, budget, oracle
from tandem.eval.features import ImageFeatures, renderings
from tandem.eval.judges import ExactJudge, Measures, ScorerJudge, load_judge, reference_images
from tandem.eval.sweep import SamplerConfig, Sweep
from tandem.models import world_dir
from tandem.scorers import CLIPScorer
from tandem.world.checker import check_batch


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """The world CLIP laid out like a hub CLIP: model, tokenizer and preprocessor config in one directory."""
    from transformers import CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    CLIPModel.from_pretrained(world_dir() / "clip").save_pretrained(d)
    CLIPTokenizer.from_pretrained(world_dir() / "tokenizer").save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return str(d)


@pytest.fixture(scope="module")
def pipe():
    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_guidance_scale=4.5)
    pipe.calibration = pipe.calibrate(PROMPTS, seed=9)
    return pipe


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    for i, image in enumerate(renderings(PROMPTS, 5)):
        Image.fromarray(image).save(d / f"{i:05d}.png")
    return d


def test_the_exact_judge_is_the_checker():
    images = renderings(PROMPTS, 0)
    judged = ExactJudge()(images, PROMPTS)
    results = check_batch(list(images), PROMPTS)
    assert judged["satisfied"].all() and list(judged["score"]) == [r.score for r in results]


def test_a_scorer_judge_scores_like_its_scorer(clip):
    judge = load_judge(f"clip:{clip}")
    assert isinstance(judge, ScorerJudge) and not judge.exact
    images = renderings(PROMPTS, 0)
    own = judge(images, PROMPTS)["score"]
    swapped = judge(images, PROMPTS[1:] + PROMPTS[:1])["score"]
    assert set(judge(images, PROMPTS)) == {"score"}
    assert own.mean() > swapped.mean()  # a caption's own rendering scores higher than another caption's
    assert judge.describe()["scorer"]["kind"] == "clip"
    with pytest.raises(ValueError, match="unknown scorer kind"):
        load_judge("lpips")
    with pytest.raises(ValueError, match="no tokenizer vocabulary"):  # the shipped clip/ keeps its tokenizer apart
        load_judge(f"clip:{world_dir() / 'clip'}")


def test_reference_images_are_read_resized_and_checked(clip, reference_dir, tmp_path):
    images = reference_images(reference_dir, 16)
    assert images.shape == (len(PROMPTS), 16, 16, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="not a directory"):
        reference_images(tmp_path / "missing", 16)
    (tmp_path / "one").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "one" / "a.png")
    with pytest.raises(ValueError, match=">= 2"):
        reference_images(tmp_path / "one", 16)
    with pytest.raises(ValueError, match="feature network"):
        Measures.from_specs(f"clip:{clip}", reference=reference_dir)


def test_features_refuse_a_model_that_is_neither_clip_nor_dinov2(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="'vit' model; expected a CLIP or a DINOv2"):
        ImageFeatures.from_pretrained(str(tmp_path / "vit"))


def test_budget_and_oracle_with_a_scorer_judge(pipe, clip, reference_dir, tmp_path):
    measures = Measures.from_specs(f"clip:{clip}", features=clip, clip_score=clip, reference=reference_dir)
    cfg = BudgetConfig(teacher_steps={"dpm": (2, 4), "ddim": (2,)}, student_steps=(1,), refine_sigmas=(0.6,),
                       refine_steps=2, regenerate={"dpm": (4,), "ddim": (2,)}, ks=(0, 50, 100), references=("dpm4",))
    results = budget(pipe, PROMPTS, tmp_path / "budget", seed=3, cfg=cfg, batch_size=len(PROMPTS), log=str,
                     measures=measures)
    assert results["judge"]["exact"] is False and results["measures"]["features"] == clip
    assert all("accuracy" not in p for p in results["points"])
    teacher = next(p for p in results["points"] if p["label"] == "dpm4")
    cached = np.load(tmp_path / "budget" / "cache" / "dpm4.npz")
    # the judge's score is the scorer's (a fresh one) on the cached images
    fresh = CLIPScorer.from_pretrained(clip)(list(cached["images"]), PROMPTS).double().numpy()
    np.testing.assert_allclose(cached["score"], fresh, rtol=1e-5)
    assert teacher["mean_score"] == pytest.approx(fresh.mean())
    # the Fréchet reference is the directory, in the given features
    features = ImageFeatures.from_pretrained(clip)
    from tandem.eval.features import frechet_distance

    expected = frechet_distance(features(cached["images"]),
                                features(reference_images(reference_dir, features.image_size)))
    assert teacher["frechet_distance"] == pytest.approx(expected, rel=1e-6)
    # regeneration by each scheduler of the grid: at k = 100 every image is that teacher's, at the student's cost more
    points = {p["label"]: p for p in results["points"]}
    for teacher_run in ("dpm4", "ddim2"):
        everything = points[f"adaptive regenerate {teacher_run} k=100"]
        assert everything["mean_score"] == pytest.approx(points[teacher_run]["mean_score"])
        assert everything["unet_evals_mean"] == pytest.approx(points[teacher_run]["unet_evals_mean"]
                                                              + points["student2"]["unet_evals_mean"])
    a = results["acceleration"]["dpm4"]
    assert a["best_adaptive_quality"] == max(p["mean_score"] for p in results["points"]
                                             if p["family"].startswith("adaptive") and 0 < p["k"] < 100)
    report = (tmp_path / "budget" / "report.md").read_text()
    assert "mean clip score" in report and "%" not in report.split("| run |")[1].splitlines()[2]

    orc = oracle(pipe, PROMPTS, tmp_path / "oracle", seed=3, cfg=OracleConfig(teacher_steps=4, ks=(0, 50), seeds=2),
                 batch_size=len(PROMPTS), log=str, measures=measures)
    assert "accuracy" not in orc["teacher"] and orc["teacher"]["mean_score"] > 0
    assert all("accuracy" not in s for s in orc["synthetic_oracle"])


class TinyFeatureNet(torch.nn.Module):
    """A stand-in for the FID's Inception: uint8 images [N, 3, S, S] -> 12 raw features."""

    num_features = 12

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, self.num_features, 4, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 255)).mean((2, 3)) * 10


def test_frechet_distance_equals_torchmetrics_fid_on_the_same_network():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from tandem.eval.features import InceptionFeatures, frechet_distance

    real, fake = renderings(PROMPTS * 8, 1), renderings(PROMPTS[::-1] * 8, 2)
    features = InceptionFeatures(TinyFeatureNet(), image_size=16)
    ours = frechet_distance(features(real), features(fake))
    fid = FrechetInceptionDistance(feature=TinyFeatureNet())
    for images, is_real in ((real, True), (fake, False)):  # the same bicubic resize, then torchmetrics
        resized = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BICUBIC)) for im in images])
        fid.update(torch.from_numpy(resized).permute(0, 3, 1, 2), real=is_real)
    assert ours > 1e-3 and ours == pytest.approx(float(fid.compute()), rel=1e-4)
    assert frechet_distance(features(real), features(real)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="uint8 images"):
        features(real.astype(np.float32))


def test_budget_reports_an_inception_fid_against_the_reference(pipe, clip, reference_dir, tmp_path):
    import dataclasses

    from tandem.eval.features import InceptionFeatures, frechet_distance

    inception = InceptionFeatures(TinyFeatureNet(), image_size=16)
    stored = reference_images(reference_dir, 16)
    measures = dataclasses.replace(Measures.from_specs(f"clip:{clip}"), fid_features=inception,
                                   fid_reference=lambda _p, _s: stored)
    cfg = BudgetConfig(teacher_steps={"dpm": (2,)}, student_steps=(1,), refine_sigmas=(0.6,), refine_steps=2,
                       regenerate={"dpm": (2,)}, ks=(0, 50, 100), references=("dpm2",))
    results = budget(pipe, PROMPTS, tmp_path / "budget", seed=3, cfg=cfg, batch_size=len(PROMPTS), log=str,
                     measures=measures)
    points = {p["label"]: p for p in results["points"]}
    cached = np.load(tmp_path / "budget" / "cache" / "dpm2.npz")
    assert points["dpm2"]["fid"] == pytest.approx(frechet_distance(inception(cached["images"]), inception(stored)))
    everything = next(p for p in results["points"] if p["family"].startswith("adaptive regenerate") and p["k"] == 100)
    assert everything["fid"] == pytest.approx(points["dpm2"]["fid"])  # k = 100: every image is the teacher's
    assert "Inception FID" in (tmp_path / "budget" / "report.md").read_text()


def test_a_cache_of_other_models_or_another_judge_is_refused(pipe, clip, tmp_path):
    Sweep(pipe, PROMPTS, 0, tmp_path).run(SamplerConfig("student", 1))
    with pytest.raises(ValueError, match="other prompts or settings"):
        Sweep(pipe, PROMPTS, 0, tmp_path, judge=load_judge(f"clip:{clip}"))
    from diffusers import UNet2DConditionModel

    other = world_pipeline(num_inference_steps=2)
    other.teacher.unet.conv_out.bias.data += 0.01  # another teacher, saved and loaded as users do
    other.teacher.unet.save_pretrained(tmp_path / "teacher")
    other.teacher.unet = UNet2DConditionModel.from_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="other prompts or settings"):
        Sweep(other, PROMPTS, 0, tmp_path)


def test_eval_command_takes_a_judge_and_checks_real_tier_options(clip, tmp_path, capsys, monkeypatch):
    out = tmp_path / "oracle"
    ok(tandem_in_process(capsys, monkeypatch, "eval", "oracle", "--prompts", "val", "--n", 4, "--batch-size", 4,
                         "--judge", f"clip:{clip}", "--out", out))
    results = json.loads((out / "results.json").read_text())
    assert results["judge"]["spec"] == f"clip:{clip}" and results["made_by"]["judge"] == f"clip:{clip}"
    assert "accuracy" not in results["student"]
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n")
    for args, message in [(("--model", "sd15-lcm", "--prompts", tmp_path / "prompts.txt"), "no exact checker"),
                          (("--model", "sd15-lcm", "--judge", "pickscore"), "prompts file"),
                          (("--features", clip), "real-tier"),
                          (("--judge", "lpips"), "unknown scorer kind"),
                          (("--fid", "inception"), "real-tier")]:
        assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", "--prompts", "val", *args,
                                            "--out", tmp_path / "x"), message)
    real = ("--model", "sd15-lcm", "--prompts", tmp_path / "prompts.txt", "--judge", f"clip:{clip}")
    fid_errors = [(("--fid", "inception"), "needs reference images"),
                  (("--fid", "swav", "--reference", tmp_path), "unknown FID network"),
                  (("--fid", f"inception:{tmp_path / 'missing.pth'}", "--reference", tmp_path), "not a file")]
    if importlib.util.find_spec("torch_fidelity") is None:
        fid_errors.append((("--fid", "inception", "--reference", tmp_path), "torch-fidelity"))
    for args, message in fid_errors:
        assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", *real, *args,
                                            "--out", tmp_path / "x"), message)
