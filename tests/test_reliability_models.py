"""Damaged and wrong model files, and architectures that would not fit in memory: each is refused with
exit status 2 and one stderr line naming the file (or option) and the problem, before anything is
written; and `tandem world add-student --overwrite` replaces a student only with one that loads.

The damaged files are made here from the tiny world and the shipped world's oracle: weights cut in
half, pickled weights, a UNet where a ControlNet belongs, a corrupt oracle config. The table-driven
test runs each case in-process against one workspace holding all of them and compares every byte of
the workspace before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from clitools import assert_refused_changing_nothing, assert_user_error, ok, snapshot, tandem_in_process
from PIL import Image

A = "a red circle"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def run(capsys, monkeypatch):
    return lambda *args: tandem_in_process(capsys, monkeypatch, *args)


def cut_in_half(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def pickle_weights(folder: Path, name: str) -> None:
    """Replace the safetensors file in ``folder`` by the same tensors pickled as ``name`` (a .bin)."""
    from safetensors.torch import load_file

    (weights,) = folder.glob("*.safetensors")
    torch.save(load_file(weights), folder / name)
    weights.unlink()


def make_student(tiny_world: Path, out: Path, seed: int = 0) -> Path:
    """A `tandem distill`-style student of the tiny world (its teacher's UNet, re-drawn from ``seed``)."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    from tandem.students import StudentInfo, save_student

    unet = UNet2DConditionModel.from_pretrained(tiny_world / "unet")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    scheduler = DPMSolverMultistepScheduler.from_pretrained(tiny_world / "scheduler")
    info = StudentInfo(method="knowledge", scheduler="DPMSolverMultistepScheduler", guidance="classifier-free",
                       steps=2, guidance_scale=3.0)
    return save_student(unet, out, scheduler, info)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_world):
    """A world with a student, and damaged copies of each kind of model file."""
    from tandem.models import world_dir

    ws = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_world, ws / "world")
    make_student(tiny_world, ws / "student")
    ok(tandem_in_process_plain("world", "add-student", "--world", ws / "world", "--student", ws / "student",
                               "--steps", 2, "--guidance-scale", 3))
    shutil.copytree(ws / "student", ws / "cut-student")
    cut_in_half(ws / "cut-student" / UNET_WEIGHTS)
    shutil.copytree(ws / "student", ws / "pickled-student")
    pickle_weights(ws / "pickled-student" / "unet", "diffusion_pytorch_model.bin")
    shutil.copytree(tiny_world, ws / "cut-text-encoder-world")
    cut_in_half(ws / "cut-text-encoder-world" / "text_encoder" / "model.safetensors")
    # a CLIP scorer directory: the world's CLIP with its tokenizer
    shutil.copytree(tiny_world / "clip", ws / "clip")
    for file in (tiny_world / "tokenizer").iterdir():
        shutil.copy(file, ws / "clip" / file.name)
    shutil.copytree(ws / "clip", ws / "cut-clip")
    cut_in_half(ws / "cut-clip" / "model.safetensors")
    shutil.copytree(ws / "clip", ws / "pickled-clip")
    pickle_weights(ws / "pickled-clip", "pytorch_model.bin")
    # oracles: the shipped one, cut short, with a config that is not JSON, and one that lacks a key
    oracle = world_dir() / "oracle"
    shutil.copytree(oracle, ws / "cut-oracle")
    cut_in_half(ws / "cut-oracle" / "model.safetensors")
    shutil.copytree(oracle, ws / "json-oracle")
    config = (oracle / "config.json").read_text()
    (ws / "json-oracle" / "config.json").write_text(config[: len(config) // 2])
    shutil.copytree(oracle, ws / "keyless-oracle")
    data = json.loads(config)
    del data["vocab_size"]
    (ws / "keyless-oracle" / "config.json").write_text(json.dumps(data))
    Image.new("RGB", (32, 32)).save(ws / "control.png")
    return ws


def tandem_in_process_plain(*args):
    """The command line in-process, outside a test's capsys (for module fixtures)."""
    import subprocess

    from tandem.cli import main

    argv = sys.argv
    sys.argv = ["tandem", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        return subprocess.CompletedProcess(args, e.code, "", "")
    finally:
        sys.argv = argv
    raise AssertionError("tandem did not exit")


ADAPTIVE = ["generate", A, "--model", "WS/world", "--mode", "adaptive", "--threshold", "0", "--out", "WS/new"]

# (arguments, words the one error line must contain); "WS" stands for the workspace
CASES = {
    # weights cut in half: named, whichever command loads them
    "student cut short": (["generate", A, "--model", "WS/world", "--mode", "student", "--student", "WS/cut-student",
                           "--out", "WS/new"], [f"WS/cut-student/{UNET_WEIGHTS}", "damaged"]),
    "oracle cut short": ([*ADAPTIVE, "--scorer", "world-oracle:WS/cut-oracle"],
                         ["WS/cut-oracle/model.safetensors", "damaged"]),
    "clip scorer cut short": ([*ADAPTIVE, "--scorer", "clip:WS/cut-clip"], ["WS/cut-clip/model.safetensors",
                                                                           "damaged"]),
    "world text encoder cut short": (["generate", A, "--model", "WS/cut-text-encoder-world", "--out", "WS/new"],
                                     ["WS/cut-text-encoder-world/text_encoder/model.safetensors", "damaged"]),
    "init-from cut short": (["world", "train", "teacher", "--init-from", "WS/cut-student/unet", "--vae",
                             "WS/world/vae", "--text-encoder", "WS/world", "--max-steps", "1", "--out", "WS/new"],
                            [f"WS/cut-student/{UNET_WEIGHTS}", "damaged"]),
    "add-student cut short": (["world", "add-student", "--world", "WS/world", "--student", "WS/cut-student",
                               "--name", "other", "--steps", "2", "--guidance-scale", "3"],
                              [f"WS/cut-student/{UNET_WEIGHTS}", "damaged"]),
    # pickled weights are refused, never unpickled
    "student pickled": (["generate", A, "--model", "WS/world", "--mode", "student", "--student",
                         "WS/pickled-student", "--out", "WS/new"],
                        ["WS/pickled-student/unet/diffusion_pytorch_model.bin", "never unpickles"]),
    "clip scorer pickled": ([*ADAPTIVE, "--scorer", "clip:WS/pickled-clip"],
                            ["WS/pickled-clip/pytorch_model.bin", "never unpickles"]),
    # the wrong model
    "unet as controlnet": (["generate", A, "--model", "WS/world", "--mode", "teacher", "--controlnet",
                            "WS/world/unet", "--control-image", "WS/control.png", "--out", "WS/new"],
                           ["WS/world/unet", "class UNet2DConditionModel", "not ControlNetModel"]),
    # an oracle's config.json: the file and the key, not only the JSON parser's words
    "oracle config not JSON": ([*ADAPTIVE, "--scorer", "world-oracle:WS/json-oracle"],
                               ["WS/json-oracle/config.json", "not valid JSON"]),
    "oracle config lacks a key": ([*ADAPTIVE, "--scorer", "world-oracle:WS/keyless-oracle"],
                                  ["WS/keyless-oracle/config.json", "'vocab_size'"]),
    # architectures past any memory: refused up front, with the bound
    "oracle channels 10**8": (["world", "train", "oracle", "--channels", "100000000,64", "--out", "WS/new"],
                              ["oracle arch channels", "<= 4096", "1e+08"]),
    "oracle width 10**9": (["world", "train", "oracle", "--width", str(10**9), "--out", "WS/new"],
                           ["oracle arch width", "<= 4096"]),
    "oracle width past float": (["world", "train", "oracle", "--width", str(10**400), "--out", "WS/new"],
                                ["oracle arch width", "<= 4096", "401 digits"]),
    "knowledge channels 10**8": (["distill", "knowledge", "--teacher", "WS/world", "--arch", "custom",
                                  "--channels", "99999999,1,1", "--out", "WS/new"],
                                 ["block_out_channels", "<= 4096"]),
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_models_are_one_line_exit_2_and_change_nothing(case, workspace, run):
    assert_refused_changing_nothing(run, workspace, *CASES[case])


def test_a_missing_scorer_package_names_it_and_its_install(workspace, run, monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import ImageReward -> ModuleNotFoundError
    before = snapshot(workspace)
    result = run("generate", A, "--model", workspace / "world", "--mode", "adaptive", "--threshold", "0",
                 "--scorer", "imagereward", "--out", workspace / "new")
    assert_user_error(result, "ImageReward", "pip install image-reward")
    assert snapshot(workspace) == before


# -- add-student --overwrite: the old student stays until a whole new one takes its place ---------------


@pytest.fixture
def world_with_student(workspace, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(workspace / "world", world)
    return world


def test_a_damaged_replacement_leaves_the_student_byte_identical(workspace, world_with_student, run):
    world = world_with_student
    before = snapshot(world)
    result = run("world", "add-student", "--world", world, "--student", workspace / "cut-student", "--steps", 2,
                 "--guidance-scale", 3, "--overwrite")
    assert_user_error(result, str(workspace / "cut-student" / UNET_WEIGHTS))
    assert snapshot(world) == before  # the student, tandem.json, and no staging directory left beside them


def test_overwrite_replaces_the_student_whole(tiny_world, world_with_student, run, tmp_path):
    from safetensors.torch import load_file

    world = world_with_student
    new = make_student(tiny_world, tmp_path / "new-student", seed=1)
    ok(run("world", "add-student", "--world", world, "--student", new, "--steps", 3, "--guidance-scale", 2.5,
           "--overwrite"))
    shipped = load_file(world / "student" / UNET_WEIGHTS)
    for key, value in load_file(new / UNET_WEIGHTS).items():
        assert torch.equal(shipped[key], value.half())
    assert json.loads((world / "tandem.json").read_text())["student"] == {"path": "student", "steps": 3,
                                                                        "guidance_scale": 2.5}
    assert sorted(p.name for p in world.iterdir()) == sorted([p.name for p in tiny_world.iterdir()] + ["student"])


@pytest.mark.parametrize("name", [None, "other"])  # replacing the preset student; adding a named one
def test_a_failure_while_copying_leaves_the_world_as_it_was(name, tiny_world, world_with_student, tmp_path,
                                                            monkeypatch):
    from tandem.world import assemble

    world = world_with_student
    new = make_student(tiny_world, tmp_path / "new-student", seed=1)
    evaluation = tmp_path / "results.json"
    evaluation.write_text("{}\n")
    before = snapshot(world)

    def full_disk(src, dst, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(assemble.shutil, "copy", full_disk)
    with pytest.raises(OSError, match="No space left"):
        assemble.add_student(world, new, 2, 3.0, overwrite=True, name=name,
                             evaluations={"eval_test.json": evaluation})
    assert snapshot(world) == before


def test_overwrite_replaces_a_symlinked_student_without_following_it(tiny_world, world_with_student, tmp_path):
    from tandem.world.assemble import add_student

    world = world_with_student
    elsewhere = tmp_path / "elsewhere"
    shutil.move(world / "student", elsewhere)
    os.symlink(elsewhere, world / "student")
    kept = snapshot(elsewhere)
    add_student(world, make_student(tiny_world, tmp_path / "new-student", seed=1), 2, 3.0, overwrite=True)
    assert not (world / "student").is_symlink() and (world / "student" / UNET_WEIGHTS).is_file()
    assert snapshot(elsewhere) == kept  # the link's target is the user's: replaced in the world, never deleted


# -- the library's checks ----------------------------------------------------------------------------------


def test_load_pretrained_refuses_weights_that_leave_tensors_unset(tiny_world):
    from transformers import CLIPModel

    from tandem.checks import load_pretrained

    with pytest.raises(ValueError, match=r"text_encoder'? has no weights for \d+ of the CLIPModel's tensors"):
        load_pretrained(CLIPModel.from_pretrained, tiny_world / "text_encoder", "CLIP")
    assert isinstance(load_pretrained(CLIPModel.from_pretrained, tiny_world / "clip", "CLIP"), CLIPModel)


def test_check_weights_takes_safetensors_beside_a_pickle(workspace, tmp_path):
    from tandem.checks import check_weights

    both = tmp_path / "both"
    shutil.copytree(workspace / "clip", both)
    shutil.copy(workspace / "pickled-clip" / "pytorch_model.bin", both)
    assert check_weights(both, "CLIP") == both  # the safetensors file is read; the pickle never is
    with pytest.raises(ValueError, match="never unpickles"):
        check_weights(both / "pytorch_model.bin", "CLIP")


def test_oracle_configs_that_would_not_fit_in_memory_are_refused_before_allocating(tmp_path):
    from tandem.models import world_dir
    from tandem.world.oracle import WorldOracleScorer

    oracle = tmp_path / "oracle"
    shutil.copytree(world_dir() / "oracle", oracle)
    data = json.loads((oracle / "config.json").read_text())
    data["vocab_size"] = 10**9
    (oracle / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: 'vocab_size' must be <= 1\.04858e\+06"):
        WorldOracleScorer.from_pretrained(oracle)
    clip_oracle = tmp_path / "oracle-clip"
    clip_oracle.mkdir()
    data = json.loads((world_dir() / "oracle-clip" / "config.json").read_text())
    data["clip"]["text_config"]["hidden_size"] = 10**9
    (clip_oracle / "config.json").write_text(json.dumps(data))
    (clip_oracle / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"config.json: 'clip' text_config 'hidden_size' must be <= 4096"):
        WorldOracleScorer.from_pretrained(clip_oracle)
