"""Reliability of routing (issue 27, items 5, 6 and part of 10): a cascade run spends what its table chose (UNet
evaluations counted at the UNets themselves), an image a cascade level keeps is final, a budget below the cheapest
level is refused; route tables, cascade tables and preset files are checked on load and on save; options that
would be ignored are refused in one line, with the workspace left as it was."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import assert_user_error, ok, tandem_in_process

from tandem.cascade import Cascade, CascadeTable, check_levels
from tandem.presets import PRESETS, preset_to_json, read_preset_file, world_calibration_path, write_preset_file
from tandem.routes import Route, RouteTable

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "a small blue square at the top left", "a green triangle",
           "an orange triangle to the left of a large green circle", "a large purple circle at the bottom",
           "a yellow square above a small red triangle"]


def run(capsys, monkeypatch, *args):
    return tandem_in_process(capsys, monkeypatch, *args)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("routing")


@pytest.fixture
def cascade_table(workspace, capsys, monkeypatch):
    """A cascade table (the 1-step student, then the world preset's 4-step student, then its teacher) made by
    `tandem calibrate --cascade 1` on PROMPTS, once per module."""
    prompts, table = workspace / "p.txt", workspace / "c.json"
    if not table.exists():
        prompts.write_text("\n".join(PROMPTS) + "\n")
        ok(run(capsys, monkeypatch, "calibrate", "--cascade", 1, "--prompts", prompts, "--out", table))
    return table


class UNetRows:
    """Counts the batch rows every diffusers UNet processes (one row: one evaluation for one image; a
    classifier-free guided step counts two), at the UNet's own forward, whoever calls it."""

    def __init__(self, monkeypatch):
        from diffusers import UNet2DConditionModel

        self.rows = 0
        original = UNet2DConditionModel.forward

        @functools.wraps(original)
        def forward(unet, sample, *args, **kwargs):
            self.rows += int(sample.shape[0])
            return original(unet, sample, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", forward)


def hand_cost(table: dict, thresholds: list) -> tuple[list[int], float]:
    """Where each prompt of a cascade table's JSON ends and the mean cost, by hand: each student level with a
    threshold (the last always) draws the images that reached it; one scoring at least its threshold stays; the
    rest of the last level go to the teacher (final level len(levels))."""
    levels, scores, costs = table["levels"], table["scores"], table["costs"]
    ends, total = [], 0.0
    for i in range(len(scores[0])):
        end = len(levels)
        for j in range(len(levels)):
            last = j == len(levels) - 1
            if thresholds[j] is None and not last:
                continue  # a level that keeps nothing is not drawn
            total += costs[j]
            if thresholds[j] is not None and scores[j][i] >= thresholds[j]:
                end = j
                break
        if end == len(levels):
            total += costs[-1]
        ends.append(end)
    return ends, total / len(scores[0])


def test_a_cascade_run_spends_what_its_table_chose_and_keeps_what_a_level_kept(cascade_table, workspace, capsys,
                                                                              monkeypatch):
    table = json.loads(cascade_table.read_text())
    assert table["levels"] == [1, 4]
    # the budget of the issue, the cheapest point that draws both students, and the dearest point
    drawn_both = [p for p in table["front"] if p["thresholds"][0] is not None]
    budgets = sorted({2.0, drawn_both[-1]["cost"], table["front"][-1]["cost"]})
    for b, budget in enumerate(budgets):
        out = workspace / f"gen-{b}"
        counter = UNetRows(monkeypatch)
        ok(run(capsys, monkeypatch, "generate", "--mode", "adaptive", "--cascade", cascade_table, "--budget", budget,
               "--prompts", workspace / "p.txt", "--out", out))
        monkeypatch.undo()
        config = json.loads((out / "config.json").read_text())
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        chosen = config["cascade"]["chosen"]
        spent = counter.rows / len(PROMPTS)  # what the UNets actually ran, per image
        ends, expected = hand_cost(table, chosen["thresholds"])
        assert chosen["cost"] <= budget + 1e-9
        assert spent == pytest.approx(chosen["cost"]), (budget, chosen)
        assert spent == pytest.approx(expected)
        assert spent == pytest.approx(np.mean([r["unet_evals"]["total"] for r in records]))
        for i, r in enumerate(records):
            if ends[i] == 0:  # kept by the 1-step student: final, never re-routed by the next level or the teacher
                assert r["cascade_levels"] == [1] and r["path"] == "accepted"
                assert r["unet_evals"] == {"student": table["costs"][0], "teacher": 0.0, "total": table["costs"][0]}
            else:
                assert r["cascade_levels"][-1] == 4
                assert (r["path"] == "refined") == (ends[i] == 2)


def test_a_cascade_table_is_cheapest_first_and_refuses_a_budget_below_its_cheapest_level(tmp_path):
    scores = np.array([[0.1, 0.9, 0.3], [0.5, 0.6, 0.8], [0.7, 0.7, 0.9]])
    table = CascadeTable([1, 4], scores, [1.0, 4.0, 20.0], {})
    assert table.choose(1.0)["cost"] == pytest.approx(1.0)  # every image kept by the 1-step student
    for budget in (0.5, 0.999):
        with pytest.raises(ValueError, match=rf"budget {budget:g} .*cheapest point \(1: .*1-step student"):
            table.choose(budget)
    for levels, costs, words in (([4, 1], [4.0, 1.0, 20.0], "cheapest first"), ([2, 2], [2.0, 2.0, 20.0], "none twice"),
                                 ([1, 4], [4.0, 1.0, 20.0], "cheapest first: levels 1, 4 cost 4, 1"),
                                 ([1, 4], [1.0, math.nan, 20.0], "cost of level 1"),
                                 ([1, 4], [1.0, 4.0, -20.0], "cost of level 2")):
        with pytest.raises(ValueError, match=words):
            CascadeTable(levels, scores, costs, {})
        path = tmp_path / "t.json"
        path.write_text(json.dumps({"kind": "tandem cascade table", "levels": levels, "costs": costs,
                                    "scores": scores.tolist(), "fingerprint": {}}))
        with pytest.raises(ValueError, match=f"cascade table {path}: .*{words}"):
            CascadeTable.load(path)
    for steps in ((2, 1), (1, 1)):
        with pytest.raises(ValueError, match="cascade steps must be cheapest first"):
            Cascade(steps, (0.5, 0.5))
    assert check_levels([1, 2], 4) == [1, 2]
    with pytest.raises(ValueError, match=r"fewer steps than the student the cascade ends with \(4 steps\); got 1, 4"):
        check_levels([1, 4], 4)


def shipped_routes() -> dict:
    from tandem.models import world_dir

    return json.loads((world_dir() / "routes.json").read_text())


def test_route_tables_are_checked_on_load_and_on_save(tmp_path):
    good = {"format": "tandem-routes/1", "fingerprint": {"student_steps": 4}, "config": {}, "routes": [
        {"strategy": None, "teacher_scheduler": None, "teacher_steps": None, "rollback_sigma": None,
         "percentile": 0.0, "cost": 4.0, "quality": 0.5},
        {"strategy": "refine", "teacher_scheduler": "dpm", "teacher_steps": 10, "rollback_sigma": 0.7,
         "percentile": 50.0, "cost": 14.0, "quality": 0.6}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    table = RouteTable.load(tmp_path / "good.json")
    assert table.choose(14.0) == Route("refine", "dpm", 10, 0.7, 50.0, 14.0, 0.6)
    for field, value, words in (("cost", math.nan, "cost must be a finite number"),
                                ("cost", -1.0, "cost must be >= 0"),
                                ("quality", math.nan, "quality must be a finite number"),
                                ("percentile", 150.0, r"percentile must be in \[0, 100\]"),
                                ("rollback_sigma", 0.0, r"rollback_sigma must be in \(0, 1\]"),
                                ("strategy", "teleport", "strategy must be"),
                                ("teacher_steps", 0, "teacher_steps must be >= 1")):
        bad = json.loads(json.dumps(good))
        bad["routes"][1][field] = value
        path = tmp_path / f"bad-{field}-{value}.json"
        path.write_text(json.dumps(bad))  # json writes NaN as NaN, and reads it back
        with pytest.raises(ValueError, match=f"route table {path}: route 1: {words}"):
            RouteTable.load(path)
        # saving checks the same: a table changed after it was made writes nothing
        table = RouteTable.load(tmp_path / "good.json")
        table.routes[1] = dataclasses.replace(table.routes[1], **{field: value})
        with pytest.raises(ValueError, match=f"not written: route 1: {words}"):
            table.save(tmp_path / "out.json")
        assert not (tmp_path / "out.json").exists()
    assert len(RouteTable(**{k: v for k, v in vars(RouteTable.load(tmp_path / "good.json")).items()}).routes) == 2
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps(shipped_routes()))
    assert len(RouteTable.load(shipped).routes) == len(shipped_routes()["routes"])  # the world's own table passes


def world_preset_file(path: Path, **changes) -> Path:
    """The world preset as a preset file, with ``changes`` to its JSON fields (``defaults`` merged)."""
    data = preset_to_json(PRESETS["world"])
    for key, value in changes.items():
        data[key] = {**data[key], **value} if key == "defaults" else value
    path.write_text(json.dumps(data))
    return path


def test_preset_files_are_checked_on_read_and_on_write(tmp_path):
    (tmp_path / "mine-calibration.json").write_bytes(world_calibration_path().read_bytes())
    beside = read_preset_file(world_preset_file(tmp_path / "ok.json", calibration="mine-calibration.json"))
    assert beside.calibration == str(tmp_path / "mine-calibration.json")  # relative to the preset file
    for key, value, words in (
            ("calibration", "missing-calibration.json",
             f"'calibration' names {tmp_path / 'missing-calibration.json'}, which does not exist"),
            ("routes", "world:no-such-routes.json", "'routes' names world:no-such-routes.json, which does not exist"),
            ("edit_calibrations", {"0.6": "gone.json"}, r"'edit_calibrations\[0.6\]' names .*gone.json"),
            ("defaults", {"rollback_sigma": 5}, r"default setting rollback_sigma must be in \(0, 1\], got 5"),
            ("defaults", {"percentile": -1}, r"default setting percentile must be in \[0, 100\], got -1"),
            ("defaults", {"teacher_steps": 2.5}, "default setting teacher_steps must be a whole number"),
            ("defaults", {"guidance_scale": math.nan}, "default setting guidance_scale must be a finite number"),
            ("defaults", {"strategy": "teleport"}, "default setting strategy must be one of refine, regenerate")):
        path = world_preset_file(tmp_path / "bad.json", **{key: value})
        with pytest.raises(ValueError, match=f"preset file {path}: {words}"):
            read_preset_file(path)
    mine = dataclasses.replace(PRESETS["world"], name="mine", defaults={**PRESETS["world"].defaults,
                                                                          "rollback_sigma": 5.0})
    with pytest.raises(ValueError, match=r"preset mine \(not written to .*\): default setting rollback_sigma must "
                                         r"be in \(0, 1\], got 5"):
        write_preset_file(mine, tmp_path / "mine.json")
    missing = dataclasses.replace(PRESETS["world"], name="mine", routes=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="'routes' names .*nope.json, which does not exist"):
        write_preset_file(missing, tmp_path / "mine.json")
    assert not (tmp_path / "mine.json").exists()


def test_explicit_settings_opt_out_of_the_presets_route_table_and_the_config_says_so(workspace, capsys,
                                                                                      monkeypatch):
    out = workspace / "opt-out"
    ok(run(capsys, monkeypatch, "generate", *PROMPTS[:2], "--mode", "adaptive", "--budget", 8, "--strategy",
           "regenerate", "--teacher-steps", 4, "--out", out))
    config = json.loads((out / "config.json").read_text())
    assert config["route"] is None and config["routes"] is None  # the preset's table took no part
    assert config["percentile"] == pytest.approx(100 * (8 - 4) / (4 * 2))  # the cost formula: 4 + k% of 4 x 2


def _routes_with(workspace: Path, name: str, **change) -> Path:
    data = shipped_routes()
    data["routes"][3] = {**data["routes"][3], **change}
    path = workspace / name
    path.write_text(json.dumps(data))
    return path


def _cascade_with(workspace: Path, name: str, table: Path, levels, costs) -> Path:
    data = json.loads(table.read_text())
    data.update(levels=levels, costs=costs)
    path = workspace / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def refusal_files(workspace, cascade_table):
    """The files the refusals below name, written once into the workspace."""
    w = workspace
    if not (w / "presets").exists():
        (w / "presets").mkdir()
        _routes_with(w, "nan-cost.json", cost=math.nan)
        _routes_with(w, "negative-cost.json", cost=-3.0)
        _routes_with(w, "nan-quality.json", quality=math.nan)
        _routes_with(w, "k150.json", percentile=150.0)
        _cascade_with(w, "disorder.json", cascade_table, [4, 1], [4.0, 1.0, 10.0])
        _cascade_with(w, "twice.json", cascade_table, [4, 4], [4.0, 4.0, 10.0])
        _cascade_with(w, "dearer-first.json", cascade_table, [1, 4], [4.0, 1.0, 10.0])
        world_preset_file(w / "presets" / "no-calibration.json", calibration="missing-calibration.json")
        world_preset_file(w / "presets" / "no-routes.json", routes="missing-routes.json")
        world_preset_file(w / "presets" / "sigma5.json", defaults={"rollback_sigma": 5})
    return w


GENERATE = ["generate", "--prompts", "p.txt", "--mode", "adaptive", "--out", "out"]
REFUSALS = {
    # item 5: a budget below what the cheapest cascade level costs
    "cascade budget below the cheapest level": ([*GENERATE, "--cascade", "c.json", "--budget", 0.5],
                                                ["budget 0.5", "cheapest", "1-step student"]),
    # item 10: cascade levels cheapest first, none twice, in the --cascade spec and in a table
    "--cascade levels dearest first": (["calibrate", "--cascade", 2, "--cascade", 1, "--prompts", "p.txt", "--out",
                                        "new.json"], ["--cascade", "cheapest first", "2, 1"]),
    "--cascade level twice": (["calibrate", "--cascade", 1, "--cascade", 1, "--prompts", "p.txt", "--out",
                               "new.json"], ["--cascade", "none twice", "1, 1"]),
    "--cascade level of the student's steps": (["calibrate", "--cascade", 1, "--cascade", 4, "--prompts", "p.txt",
                                                "--out", "new.json"], ["--cascade", "fewer steps", "(4 steps)"]),
    "cascade table dearest first": ([*GENERATE, "--cascade", "disorder.json", "--budget", 5],
                                    ["disorder.json", "cheapest first", "4, 1"]),
    "cascade table level twice": ([*GENERATE, "--cascade", "twice.json", "--budget", 5],
                                  ["twice.json", "none twice", "4, 4"]),
    "cascade table costs dearest first": ([*GENERATE, "--cascade", "dearer-first.json", "--budget", 5],
                                          ["dearer-first.json", "cheapest first", "cost 4, 1"]),
    "--cascade with --strategy": ([*GENERATE, "--cascade", "c.json", "--budget", 5, "--strategy", "regenerate"],
                                  ["--cascade", "--strategy"]),
    # item 10: calibrate's edits bring their own prompts
    "--edits with --prompts": (["calibrate", "--edits", "val", "--prompts", "p.txt", "--out", "new.json"],
                               ["--edits", "--prompts"]),
    # item 6: a route table together with the settings it would choose; route tables checked on load
    "--routes with --strategy": ([*GENERATE, "--budget", 15, "--routes", "nan-cost.json", "--strategy", "refine"],
                                 ["--routes", "--strategy"]),
    "--routes with --teacher-steps": ([*GENERATE, "--budget", 15, "--routes", "nan-cost.json", "--teacher-steps", 4],
                                      ["--routes", "--teacher-steps"]),
    "route cost NaN": ([*GENERATE, "--budget", 15, "--routes", "nan-cost.json"],
                       ["nan-cost.json", "route 3", "cost must be a finite number", "nan"]),
    "route cost negative": ([*GENERATE, "--budget", 15, "--routes", "negative-cost.json"],
                            ["negative-cost.json", "route 3", "cost must be >= 0", "-3"]),
    "route quality NaN": ([*GENERATE, "--budget", 15, "--routes", "nan-quality.json"],
                          ["nan-quality.json", "route 3", "quality must be a finite number"]),
    "route percentile 150": ([*GENERATE, "--budget", 15, "--routes", "k150.json"],
                             ["k150.json", "route 3", "percentile must be in [0, 100]"]),
    # item 6: preset files name files that exist, and settings in range
    "preset without its calibration": (["generate", "a red circle", "--preset", "presets/no-calibration.json",
                                        "--mode", "adaptive", "--out", "out"],
                                       ["presets/no-calibration.json", "'calibration'", "missing-calibration.json",
                                        "does not exist"]),
    "preset without its route table": (["generate", "a red circle", "--preset", "presets/no-routes.json",
                                        "--mode", "student", "--out", "out"],
                                       ["presets/no-routes.json", "'routes'", "missing-routes.json",
                                        "does not exist"]),
    "preset with rollback_sigma 5": (["generate", "a red circle", "--preset", "presets/sigma5.json", "--mode",
                                      "adaptive", "--out", "out"],
                                     ["presets/sigma5.json", "rollback_sigma", "(0, 1]", "5"]),
    "preset save rollback_sigma=5": (["preset", "save", "--set", "rollback_sigma=5", "--out", "new.json"],
                                     ["--set", "rollback_sigma", "(0, 1]"]),
    "preset save percentile=150": (["preset", "save", "--set", "percentile=150", "--out", "new.json"],
                                   ["--set", "percentile", "[0, 100]"]),
    "preset save edit_strength=2": (["preset", "save", "--set", "edit_strength=2", "--out", "new.json"],
                                    ["--set", "edit_strength", "(0, 1]"]),
    "preset save guidance_scale=-1": (["preset", "save", "--set", "guidance_scale=-1", "--out", "new.json"],
                                      ["--set", "guidance_scale", ">= 0"]),
    "preset save a setting twice": (["preset", "save", "--set", "teacher_steps=2", "--set", "teacher_steps=3",
                                     "--out", "new.json"], ["--set", "teacher_steps", "twice"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_exit_2_and_leave_the_workspace_unchanged(case, refusal_files, tmp_path, capsys,
                                                                         monkeypatch):
    argv, words = REFUSALS[case]
    workspace = tmp_path / "w"  # each case its own copy of the files: one case's leftovers never meet another's
    shutil.copytree(refusal_files, workspace, ignore=shutil.ignore_patterns("gen-*", "opt-out"))
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    result = run(capsys, monkeypatch, *argv)
    assert_user_error(result, *map(str, words))
    assert snapshot(workspace) == before
