"""Route tables (what a budget alone picks): made from a budget run, a route's recorded quality and cost are
what a real adaptive run at that budget gives on the same prompts and seed; the table refuses other
calibrations and settings; explicit settings opt out; files round-trip and bad ones are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clitools import assert_user_error, tandem_in_process
from worldtools import PROMPTS, world_pipeline

from tandem.eval.experiments import BudgetConfig, budget
from tandem.eval.judges import ExactJudge, Measures
from tandem.routes import Route, RoutesMismatch, RouteTable
from tandem.world.checker import check_batch


@pytest.fixture(scope="module")
def pipe():
    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_guidance_scale=4.5)
    pipe.calibration = pipe.calibrate(PROMPTS, seed=7)
    return pipe


@pytest.fixture(scope="module")
def results(pipe, tmp_path_factory):
    cfg = BudgetConfig(teacher_steps={"dpm": (4,)}, student_steps=(2,), refine_sigmas=(0.6,), refine_steps=3,
                       regenerate={"dpm": (4,)}, ks=(0, 30, 50, 70, 100), references=("dpm4",),
                       mixed_teacher_probs=(), mixed_teacher_first=False)
    return budget(pipe, PROMPTS, tmp_path_factory.mktemp("budget"), seed=3, cfg=cfg, batch_size=len(PROMPTS),
                  log=str, measures=Measures(ExactJudge()))


def test_a_route_is_what_the_adaptive_pipeline_gives_at_that_budget(pipe, results):
    table = RouteTable.from_budget(results, pipe)
    strategies = {r.strategy for r in table.routes}
    assert strategies == {None, "refine", "regenerate"} and table.routes[0].strategy is None  # the student alone
    assert {r.teacher_steps for r in table.routes if r.strategy == "refine"} == {3}
    pipe.routes = table
    try:
        for budget_value in (2.0, 6.0, 12.0, 30.0):
            route = table.choose(budget_value)
            assert route is not None and route.cost <= budget_value
            best = max((r for r in table.routes if r.cost <= budget_value), key=lambda r: r.quality)
            assert best.quality - best.se <= route.quality <= best.quality  # within one standard error of it
            out = pipe(PROMPTS, budget=budget_value, seed=3, batch_size=len(PROMPTS))
            assert out.summary["settings"]["route"] == {**route.__dict__}
            # the same prompts and seed: the run reaches exactly the route's recorded cost and quality
            assert out.summary["unet_evals_mean"] == pytest.approx(route.cost)
            satisfied = np.mean([r.satisfied for r in check_batch(out.images, PROMPTS)])
            assert satisfied == pytest.approx(route.quality)
            if route.strategy is not None:
                assert out.summary["settings"]["strategy"] == route.strategy
                assert out.summary["settings"]["percentile"] == route.percentile
        # explicit settings opt out: the budget then sets k by the cost formula, as without routes
        out = pipe(PROMPTS, budget=6.0, strategy="regenerate", teacher_steps=4, seed=3)
        assert out.summary["settings"]["route"] is None and out.summary["settings"]["percentile"] == pytest.approx(
            100 * (6 - 2) / 8)
        assert table.choose(1.0) is None
        with pytest.raises(ValueError, match="below the student's own cost"):
            pipe(PROMPTS, budget=1.0)
        with pytest.raises(RoutesMismatch, match="student_steps: routes have 2, this call has 3"):
            pipe(PROMPTS, budget=6.0, num_inference_steps=3)
    finally:
        pipe.routes = None


def test_a_route_table_belongs_to_its_calibration(pipe, results, tmp_path):
    table = RouteTable.from_budget(results, pipe)
    saved = pipe.calibration
    pipe.calibration = pipe.calibrate(PROMPTS[:4], seed=8)
    try:
        with pytest.raises(RoutesMismatch, match="another calibration"):
            RouteTable.from_budget(results, pipe)
        pipe.routes = table
        with pytest.raises(RoutesMismatch, match="calibration"):
            pipe(PROMPTS, budget=6.0)
    finally:
        pipe.calibration, pipe.routes = saved, None
    table.save(tmp_path / "routes.json")
    with pytest.raises(FileExistsError):
        table.save(tmp_path / "routes.json")
    back = RouteTable.load(tmp_path / "routes.json")
    assert back.routes == table.routes and back.fingerprint == json.loads(json.dumps(table.fingerprint))
    (tmp_path / "bad.json").write_text('{"format": "tandem-routes/1", "routes": [{"cost": 1}]}')
    with pytest.raises(ValueError, match="malformed route table"):
        RouteTable.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "tandem-calibration/1"}')
    with pytest.raises(ValueError, match="not a route table"):
        RouteTable.load(tmp_path / "other.json")
    assert Route(None, None, None, None, 0.0, 2.0, 0.5).settings()["percentile"] == 0.0


def refine(cost: float, quality: float, se: float | None = 0.02) -> Route:
    return Route("refine", "dpm", 10, 0.5, 10.0, cost, quality, se)


def test_a_budget_takes_the_cheapest_route_within_one_standard_error_and_never_a_worse_one():
    """A hand-made grid of costs and qualities, the choices worked out by hand."""
    alone = Route(None, None, None, None, 0.0, 4.0, 0.50, 0.02)
    r6, r8, r10, r12, r20, r25 = (refine(6, 0.515), refine(8, 0.56), refine(10, 0.55), refine(12, 0.575),
                                  refine(20, 0.59), refine(25, 0.54))
    table = RouteTable([alone, r6, r8, r10, r12, r20, r25], {}, {})
    # 6: 0.515 is within 0.02 of the student alone's 0.50; 12: r8 within 0.02 of r12; 20: r12 within 0.02 of r20
    expected = {3.9: None, 4: alone, 7.9: alone, 8: r8, 11: r8, 15: r8, 19.9: r8, 20: r12, 30: r12}
    assert {b: table.choose(b) for b in expected} == expected
    assert [(c["from_cost"], c["route"], c["best"], c["simpler"]) for c in table.choices()] == [
        (4.0, alone, alone, False), (8.0, r8, r8, False), (20.0, r12, r20, True)]
    # without standard errors, the best affordable route (the cheaper on a tie), as before
    plain = RouteTable([Route(None, None, None, None, 0.0, 4.0, 0.50), *(refine(r.cost, r.quality, None) for r in
                                                                          (r6, r8, r10, r12, r20, r25))], {}, {})
    assert [plain.choose(b).cost for b in (5, 7, 9, 11, 15, 22, 30)] == [4, 6, 8, 8, 12, 20, 20]
    # a best route whose margin reaches below the current choice: the current choice stays (monotone)
    a, b, c = refine(4, 0.50, 0.001), refine(8, 0.56, 0.001), refine(10, 0.60, 0.11)
    assert RouteTable([a, b, c], {}, {}).choose(10) == b


def test_a_win_rate_table_chooses_by_win_rate():
    """The same hand-made kind of grid, each route with a win rate against the teacher: by quality the budget
    takes one route, by win rate another (worked out by hand)."""
    def route(cost, quality, win, drafts=1):
        return Route("refine", "dpm", 10, 0.5, 10.0, cost, quality, 0.02, drafts, None if drafts == 1 else 0.3,
                     win, 0.01)

    alone = Route(None, None, None, None, 0.0, 4.0, 0.50, 0.02, 1, None, 0.40, 0.01)
    a, b, c = route(8, 0.60, 0.45), route(12, 0.59, 0.52), route(16, 0.61, 0.525, drafts=2)
    by_quality = RouteTable([alone, a, b, c], {}, {})
    by_win = RouteTable([alone, a, b, c], {}, {"rule": "win-rate"})
    assert by_quality.rule == "quality" and by_win.rule == "win-rate"
    # quality: a (0.60) from 8 on; c's 0.61 is within 0.02 of it, so a stays
    assert [by_quality.choose(x) for x in (4, 8, 12, 16)] == [alone, a, a, a]
    # win rate: a from 8 (0.45 > 0.40), b from 12 (0.52); c's 0.525 is within b's 0.01: b stays
    assert [by_win.choose(x) for x in (4, 8, 12, 16)] == [alone, a, b, b]
    with pytest.raises(ValueError, match="rule must be one of quality, win-rate"):
        RouteTable([alone], {}, {"rule": "speed"})
    with pytest.raises(ValueError, match="route 1 has none"):
        RouteTable([alone, refine(8, 0.6)], {}, {"rule": "win-rate"}).choices()


def test_eval_routes_refuses_the_test_prompts(tmp_path, capsys, monkeypatch):
    run = tmp_path / "budget"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"experiment": "budget", "made_by": {"prompts": "test"}}))
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "routes", run, "--out", tmp_path / "r.json"),
                      "test prompts, which only report")
    (run / "results.json").write_text(json.dumps({"experiment": "winners", "made_by": {"prompts": "val"}}))
    assert_user_error(tandem_in_process(capsys, monkeypatch, "eval", "routes", run, "--out", tmp_path / "r.json"),
                      "tandem eval budget")
    assert not (tmp_path / "r.json").exists()
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", "a red circle", "--routes", tmp_path / "x",
                                        "--out", tmp_path / "g"), "--routes goes with --mode adaptive and --budget")


def test_the_world_ships_a_route_table_for_its_preset(tmp_path, capsys, monkeypatch):
    from tandem.pipeline import load_preset
    from tandem.presets import compose

    pipe = load_preset("world")
    assert pipe.routes is not None and pipe.routes.config["prompts"] == "val"
    pipe.routes.check(pipe.route_fingerprint(int(pipe.defaults["num_inference_steps"])))  # made for this preset
    assert load_preset(compose("world", student="cd")).routes is None  # another student: not its table
    from tandem.presets import world_calibration_path

    assert load_preset("world", calibration=world_calibration_path()).routes is None  # a calibration of one's own
    out = tmp_path / "gen"
    from clitools import ok

    ok(tandem_in_process(capsys, monkeypatch, "generate", "a red circle", "a blue square", "--mode", "adaptive",
                         "--budget", 15, "--out", out))
    config = json.loads((out / "config.json").read_text())
    chosen = pipe.routes.choose(15)
    assert config["route"] == {**chosen.__dict__} and config["strategy"] == chosen.strategy
