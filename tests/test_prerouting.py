"""Routing before drawing: with a stub predictor, exactly the prompts it predicts to fail go straight to the
teacher (drawn as the teacher alone draws them from the same noise, at the pre-routing steps) and the others are
what a call without pre-routing gives; the ridge predictor against a brute-force refit (its leave-one-out spread)
and closed forms; a predictor for other scores, or pre-routing outside adaptive mode, is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from worldtools import PROMPTS, world_pipeline

from tandem.generate import prompt_generator
from tandem.prerouting import ScorePredictor, fit_score_predictor

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 2
FAIL = [0.95, 0.1, 0.9, 0.3, 0.2, 0.99]  # the stub's P(the student fails) of each of PROMPTS


class Stub:
    def __init__(self, made_for: dict):
        self.made_for, self.seen = made_for, []

    def p_below(self, prompts, features, tau):
        assert features.shape[0] == len(prompts)
        self.seen.append(tau)
        return np.array([FAIL[PROMPTS.index(p)] for p in prompts])

    def fingerprint(self):
        return {"kind": "stub", "made_for": self.made_for}


@pytest.fixture(scope="module")
def pipe():
    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_steps=4, teacher_guidance_scale=4.5,
                          teacher_scheduler="dpm", strategy="refine", rollback_sigma=0.6)
    pipe.predictor = Stub(pipe.calibration_fingerprint(2, 6.0))
    return pipe


def test_exactly_the_predicted_prompts_go_to_the_teacher(pipe):
    tau = 0.45
    plain = pipe(PROMPTS, accept_threshold=tau, seed=SEED, batch_size=4)
    out = pipe(PROMPTS, accept_threshold=tau, seed=SEED, batch_size=4, preroute=0.9, preroute_steps=3)
    assert pipe.predictor.seen[-1] == tau
    assert [r["pre_routed"] for r in out.records] == [p >= 0.9 for p in FAIL]
    for i, record in enumerate(out.records):
        if FAIL[i] >= 0.9:  # the teacher alone, from the prompt's own noise, in 3 steps; no student draft
            assert record["path"] == "regenerated" and record["student_score"] is None
            assert record["unet_evals"] == {"student": 0.0, "teacher": 6.0, "total": 6.0}
            assert record["oracle_calls"] == 0
            ref = pipe([PROMPTS[i]], mode="teacher", teacher_steps=3, generator=[prompt_generator(SEED, i)])
            assert np.abs(out.images[i].astype(int) - ref.images[0].astype(int)).max() <= 1
        else:  # as without pre-routing
            assert {k: v for k, v in record.items() if k != "pre_routed"} == plain.records[i]
            assert np.abs(out.images[i].astype(int) - plain.images[i].astype(int)).max() <= 1
    assert out.summary["settings"]["preroute"] == 0.9 and "preroute" not in plain.summary["settings"]


def test_pre_routing_with_drafts(pipe):
    saved, pipe.predictor = pipe.predictor, Stub(pipe.calibration_fingerprint(2, 6.0, drafts=2))  # best-of-2's
    try:
        out = pipe(PROMPTS[:4], accept_threshold=0.45, seed=SEED, drafts=2, preroute=0.9, preroute_steps=3,
                   batch_size=3)
    finally:
        pipe.predictor = saved
    assert [r["path"] == "regenerated" for r in out.records[:3:2]] == [True, True]
    assert [r["unet_evals"]["student"] for r in out.records] == [0.0, 4.0, 0.0, 4.0]  # 2 drafts x 2 steps


def test_pre_routing_is_refused_where_it_cannot_apply(pipe):
    with pytest.raises(ValueError, match="preroute applies to mode='adaptive' with a cut-off"):
        pipe(PROMPTS[:2], mode="student", preroute=0.9)
    with pytest.raises(ValueError, match="preroute applies to mode='adaptive' with a cut-off"):
        pipe(PROMPTS[:2], budget=8, routing="budget-exact", preroute=0.9)
    with pytest.raises(ValueError, match="preroute_steps goes with preroute"):
        pipe(PROMPTS[:2], accept_threshold=0.5, preroute_steps=3)
    with pytest.raises(ValueError, match=r"preroute must be in \(0, 1\]"):
        pipe(PROMPTS[:2], accept_threshold=0.5, preroute=1.5)
    with pytest.raises(ValueError, match="the predictor was fitted on other scores.*student_steps: predictor has 2, "
                                         "this call has 3"):
        pipe(PROMPTS[:2], accept_threshold=0.5, num_inference_steps=3, preroute=0.9)
    saved, pipe.predictor = pipe.predictor, None
    try:
        with pytest.raises(ValueError, match="preroute needs a predictor"):
            pipe(PROMPTS[:2], accept_threshold=0.5, preroute=0.9)
    finally:
        pipe.predictor = saved


def test_the_ridge_predictor_against_a_brute_force_refit(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) * [1, 2, 3, 0.5, 1]
    y = x @ [0.3, -0.2, 0.1, 0.0, 0.5] + 0.1 * rng.normal(size=30)
    fit = fit_score_predictor(x, y, {"made": "here"}, ridge=2.0)
    z = (x - x.mean(0)) / (x.std(0) + 1e-8)

    def refit(keep):  # ridge with an unpenalized intercept, by least squares on the augmented system
        a = np.vstack([np.hstack([np.ones((len(keep), 1)), z[keep]]),
                       np.hstack([np.zeros((5, 1)), math.sqrt(2.0) * np.eye(5)])])
        b = np.concatenate([y[keep], np.zeros(5)])
        return np.linalg.lstsq(a, b, rcond=None)[0]

    coef = refit(np.arange(30))
    assert fit.predict(x) == pytest.approx(coef[0] + z @ coef[1:])
    loo = [y[i] - (c := refit(np.delete(np.arange(30), i)))[0] - z[i] @ c[1:] for i in range(30)]
    assert fit.sigma == pytest.approx(math.sqrt(np.mean(np.square(loo))))
    # P(score < tau) of a Gaussian around the prediction: a half at the prediction, Phi(1) one sigma above
    mu = fit.predict(x[:1])[0]
    assert fit.p_below(["p"], x[:1], mu)[0] == pytest.approx(0.5)
    assert fit.p_below(["p"], x[:1], mu + fit.sigma)[0] == pytest.approx(0.8413447, abs=1e-6)
    fit.save(tmp_path / "predictor.json")
    back = ScorePredictor.load(tmp_path / "predictor.json")
    assert back.predict(x) == pytest.approx(fit.predict(x)) and back.sigma == fit.sigma
    (tmp_path / "bad.json").write_text('{"format": "tandem-predictor/1", "weights": [1]}')
    with pytest.raises(ValueError, match="malformed predictor"):
        ScorePredictor.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="predictor .*broken.json is not valid JSON"):
        ScorePredictor.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="predictor .*missing.json is missing"):
        ScorePredictor.load(tmp_path / "missing.json")


def test_a_fitted_predictor_routes_the_world(pipe):
    """fit_predictor on the world's captions: its features are the student's text encoder's, its scores the
    oracle's, and a call with it runs (the stand-in oracle's scores do not depend on the prompt much)."""
    saved = pipe.predictor
    try:
        pipe.predictor = pipe.fit_predictor(PROMPTS * 2, seed=1)
        assert pipe.predictor.config["n"] == 12 and pipe.text_features(PROMPTS).shape[0] == 6
        out = pipe(PROMPTS, accept_threshold=0.45, seed=SEED, preroute=0.5, preroute_steps=3)
        assert all(isinstance(r["pre_routed"], bool) for r in out.records)
    finally:
        pipe.predictor = saved


def test_the_command_line_fits_a_predictor_and_preroutes(tmp_path, capsys, monkeypatch):
    import json

    from clitools import assert_user_error, ok, tandem_in_process

    from tandem import TandemPipeline
    from tandem.world.prompts import load_prompts

    prompts = tmp_path / "val.txt"
    prompts.write_text("\n".join(load_prompts("val")[:20]) + "\n")
    fitted = tmp_path / "predictor.json"
    ok(tandem_in_process(capsys, monkeypatch, "calibrate", "--predictor", "--prompts", prompts, "--out", fitted))
    predictor = ScorePredictor.load(fitted)
    pipe = TandemPipeline.from_pretrained("world")
    want = pipe.fit_predictor(load_prompts("val")[:20])  # what the command fits: the preset's student, seed 0
    # (batched by 64 there, by 16 here: the float rounding of another batch shape)
    assert np.allclose(predictor.weights, want.weights, rtol=1e-4, atol=1e-7)
    assert predictor.sigma == pytest.approx(want.sigma, rel=1e-4)
    # generate sends ahead exactly the prompts the predictor gives P(below tau) >= P
    asked = PROMPTS[:4]
    p = predictor.p_below(asked, pipe.text_features(asked), float(pipe.calibration.threshold(50)))
    cut = float(np.sort(p)[2])
    out = tmp_path / "gen"
    ok(tandem_in_process(capsys, monkeypatch, "generate", *asked, "--mode", "adaptive", "--preroute", cut,
                         "--predictor", fitted, "--preroute-steps", 10, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["pre_routed"] for r in records] == [bool(x >= cut) for x in p]
    config = json.loads((out / "config.json").read_text())
    assert config["preroute"] == cut and config["preroute_steps"] == 10 and config["predictor"] == str(fitted)
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", asked[0], "--mode", "adaptive",
                                        "--preroute", 0.5, "--out", tmp_path / "g2"),
                      "--preroute needs a predictor: `tandem calibrate --predictor --out FILE`")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", asked[0], "--mode", "student",
                                        "--preroute", 0.5, "--out", tmp_path / "g3"),
                      "--preroute applies to --mode adaptive")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", asked[0], "--predictor", fitted,
                                        "--out", tmp_path / "g4"), "--predictor and --preroute-steps go with --preroute")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "calibrate", "--predictor", "--student-steps", 2,
                                        "--out", tmp_path / "p2.json"), "--predictor fits the preset's student")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", "--preroute", 0.8, "--out",
                                        tmp_path / "e1"), "--preroute and --predictor go together")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "oracle", "--preroute", 0.8, "--predictor",
                                        fitted, "--out", tmp_path / "e2"), "--preroute and --predictor apply to eval budget")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", "--preroute", 1.5, "--predictor",
                                        fitted, "--out", tmp_path / "e3"), "--preroute must be in (0, 1], got 1.5")
    (tmp_path / "junk.json").write_text("{}")
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "budget", "--preroute", 0.8, "--predictor",
                                        tmp_path / "junk.json", "--out", tmp_path / "e4"), "--predictor", "not a predictor")


def test_the_budget_curves_of_pre_routing_are_what_the_pipeline_gives(pipe, tmp_path):
    """``tandem eval budget`` with a predictor: a pre-routing point, composed from the student run, a refine-all run
    and the teacher's run, is what a real call with ``preroute`` gives on the same prompts and seed."""
    from tandem.eval.experiments import BudgetConfig, budget
    from tandem.eval.judges import ExactJudge, Measures
    from tandem.routes import RouteTable
    from tandem.world.checker import check_batch

    saved, pipe.calibration = pipe.calibration, pipe.calibrate(PROMPTS, seed=7)
    try:
        cfg = BudgetConfig(teacher_steps={"dpm": (4,)}, student_steps=(2,), refine_sigmas=(0.6,), refine_steps=3,
                           regenerate={}, ks=(0, 50, 100), references=("dpm4",), mixed_teacher_probs=(),
                           mixed_teacher_first=False, preroute=(0.9,), preroute_steps=3)
        results = budget(pipe, PROMPTS, tmp_path / "budget", seed=3, cfg=cfg, batch_size=4, log=str,
                         measures=Measures(ExactJudge()))
        points = {p["label"]: p for p in results["points"]}
        assert list(results["config"]["preroute"]) == [0.9] and results["predictor"]["kind"] == "stub"
        for k in (0, 50):
            point = points[f"adaptive refine sigma 0.6 preroute 0.9 k={k}"]
            out = pipe(PROMPTS, percentile=k, seed=3, strategy="refine", rollback_sigma=0.6, teacher_steps=3,
                       teacher_scheduler="dpm", preroute=0.9, preroute_steps=3, batch_size=4)
            assert point["share_prerouted"] == pytest.approx(np.mean([p >= 0.9 for p in FAIL]))
            assert point["unet_evals_mean"] == pytest.approx(out.summary["unet_evals_mean"])
            assert point["share_improved"] == pytest.approx(out.summary["share_improved"])
            assert point["accuracy"] == pytest.approx(np.mean([c.satisfied for c in check_batch(out.images, PROMPTS)]))
        # route tables do not pre-route: the table is the one of the points without pre-routing
        plain = {**results, "points": [p for p in results["points"] if "preroute" not in p]}
        assert len(plain["points"]) < len(results["points"])
        assert RouteTable.from_budget(results, pipe).routes == RouteTable.from_budget(plain, pipe).routes
    finally:
        pipe.calibration = saved
