"""`tandem edit`, `tandem generate --control`, `tandem calibrate --edits/--control`, `tandem world
edits` and `tandem world train controlnet`: outputs and one-line errors (shipped world)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clitools import assert_user_error, ok, tandem_in_process
from PIL import Image

from tandem.calibration import Calibration
from tandem.models import world_dir
from tandem.world.conditional import scenes_for_captions
from tandem.world.control import control_image
from tandem.world.edits import load_edits

PROMPTS = ["a red circle at the top left", "a large blue square", "a green triangle below a small white circle"]


@pytest.fixture
def run(capsys, monkeypatch):
    return lambda *args: tandem_in_process(capsys, monkeypatch, *args)


def test_edit_an_edit_list_in_tandem(run, tmp_path):
    out = tmp_path / "edits"
    ok(run("edit", "--edits", "test", "--n", "5", "--out", out, "--batch-size", "2"))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    cases = load_edits("test")[:5]
    shipped = Calibration.load(world_dir() / "calibration-edit-0.6.json")
    for i, (rec, case) in enumerate(zip(records, cases)):
        assert rec["prompt"] == case.prompt and rec["edit"]["attribute"] == case.attribute
        assert rec["tau"] == pytest.approx(shipped.threshold(50))  # the preset's k and shipped edit calibration
        assert rec["path"] == ("regenerated" if rec["student_score"] < rec["tau"] else "accepted")
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}_input.png")), case.image())
        assert (out / f"{i:05d}.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["edit_strength"] == 0.6 and config["strategy"] == "regenerate"
    assert config["num_inference_steps"] == 8  # the preset gives the student more steps for edits
    assert config["calibration"] == "world:calibration-edit-0.6.json"


def test_edit_files_with_one_prompt_for_all(run, tmp_path):
    for i, case in enumerate(load_edits("val")[:2]):
        Image.fromarray(case.image()).resize((64, 64)).save(tmp_path / f"in{i}.png")
    out = tmp_path / "out"
    ok(run("edit", "--image", tmp_path / "in0.png", "--image", tmp_path / "in1.png", "--prompt", "a red circle",
           "--mode", "student", "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 and {r["path"] for r in records} == {"student"}
    assert Image.open(out / "00001_input.png").size == (32, 32)  # resized to the model's resolution


def test_edit_errors(run, tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    (tmp_path / "junk.png").write_text("not an image")
    o = tmp_path / "o"
    assert_user_error(run("edit", "--out", o), "--image and --prompt")
    assert_user_error(run("edit", "--image", tmp_path / "junk.png", "--prompt", "a red circle", "--out", o),
                      "--image", "junk.png")
    assert_user_error(run("edit", "--image", img, "--image", img, "--prompt", "a red circle", "--prompt",
                          "a blue circle", "--prompt", "a green circle", "--out", o), "2 images and 3 prompts")
    assert_user_error(run("edit", "--image", img, "--prompt", "a red dog", "--out", o), "grammar")
    assert_user_error(run("edit", "--edits", "test", "--image", img, "--out", o), "--edits replaces")
    assert_user_error(run("edit", "--image", img, "--prompt", "a red circle", "--strength", "0", "--out", o),
                      "strength")
    assert_user_error(run("edit", "--image", img, "--prompt", "a red circle", "--strength", "0.5", "--out", o),
                      "edit calibration")
    assert_user_error(run("edit", "--image", img, "--prompt", "a red circle", "--mode", "student",
                          "--percentile", "50", "--out", o), "--mode adaptive")
    assert_user_error(run("edit", "--edits", tmp_path / "missing.jsonl", "--out", o), "cannot read edit file")


def test_calibrate_edits(run, tmp_path):
    lines = [c.to_json() for c in load_edits("val")[:6]]
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cal.json"
    ok(run("calibrate", "--edits", tmp_path / "edits.jsonl", "--strength", "0.5", "--out", out))
    cal = Calibration.load(out)
    assert cal.fingerprint["task"] == {"edit_strength": 0.5} and len(cal.scores) == 6
    o = tmp_path / "e"
    ok(run("edit", "--edits", tmp_path / "edits.jsonl", "--strength", "0.5", "--calibration", out, "--out", o))
    assert_user_error(run("calibrate", "--edits", "test", "--out", tmp_path / "x.json"), "never on the test list")
    assert_user_error(run("calibrate", "--strength", "0.5", "--out", tmp_path / "x.json"), "--strength applies")


def test_world_edits_command_writes_the_shipped_list(run, tmp_path):
    out = tmp_path / "val.jsonl"
    ok(run("world", "edits", "--split", "val", "--n", "4", "--out", out, "--images", tmp_path / "img"))
    shipped = [c.to_json() for c in load_edits("val")[:4]]
    assert out.read_text().splitlines() == shipped
    assert len(list((tmp_path / "img").glob("*.png"))) == 4
    assert_user_error(run("world", "edits", "--split", "val", "--n", "4", "--out", out), "exists")


def test_generate_with_a_world_controlnet(run, tmp_path):
    files = []
    for i, scene in enumerate(scenes_for_captions(PROMPTS, 0)):
        files.append(tmp_path / f"mask{i}.png")
        Image.fromarray(control_image(scene, "mask")).save(files[-1])
    out = tmp_path / "out"
    args = [a for f in files for a in ("--control-image", f)]
    ok(run("generate", *PROMPTS, "--mode", "adaptive", "--control", "mask", *args, "--out", out))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert all(r["controlnet_evals"] == r["unet_evals"]["total"] for r in records)
    assert [r["control_image"] for r in records] == [str(f) for f in files]
    assert json.loads((out / "config.json").read_text())["controlnet"] == "world:mask"
    ok(run("generate", PROMPTS[0], "--mode", "teacher", "--control", "edges", "--control-image", files[0],
           "--out", tmp_path / "t"))
    o = tmp_path / "o"
    assert_user_error(run("generate", *PROMPTS, "--control", "mask", "--out", o), "go together")
    assert_user_error(run("generate", *PROMPTS, "--control", "depth", "--control-image", files[0], "--out", o),
                      "--control depth", "edges, mask")
    assert_user_error(run("generate", *PROMPTS, "--control", "mask", "--control-image", files[0],
                          "--control-image", files[1], "--out", o), "2 images for 3 prompts")


def test_calibrate_with_a_control(run, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "cal.json"
    ok(run("calibrate", "--control", "mask", "--prompts", tmp_path / "p.txt", "--out", out))
    cal = Calibration.load(out)
    assert "controlnet" in cal.fingerprint and len(cal.scores) == 3


def test_world_train_controlnet(run, tmp_path):
    out = tmp_path / "cn"
    ok(run("world", "train", "controlnet", "--control", "edges", "--max-steps", "2", "--threads", "1", "--out", out))
    saved = json.loads((out / "controlnet" / "train_config.json").read_text())
    assert saved["config"]["control"] == "edges" and saved["steps"] == 2
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    assert_user_error(run("world", "train", "controlnet", "--out", tmp_path / "x"), "--control mask")
    assert_user_error(run("world", "train", "teacher", "--control", "mask", "--out", tmp_path / "x"),
                      "controlnet only")
    assert_user_error(run("world", "train", "controlnet", "--control", "depth", "--out", tmp_path / "x"),
                      "mask or edges")
