"""The ``tandem`` command line, run as a subprocess, against the output contract of the issue.

Bad-input cases past the first run ``tandem.cli.main`` in-process (same exit status and stderr
line, without seconds of imports each). Generated images are checked against a direct diffusers
call built by hand (not through tandem's generation code); ground-truth renderings against the
exact checker; the prompt list against the shipped file. Each ``tandem generate`` run costs
seconds (imports), so the runs are module fixtures shared by the tests that read them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import assert_user_error, ok, tandem, tandem_in_process
from PIL import Image

from tandem.outputs import RUN_RECORD
from tandem.world.checker import check

STEPS = 3  # DPM-Solver++ 2M takes a second-order step only from step 2 on
A = "a red circle"
B = "a small blue square at the top left"
C = "an orange triangle to the left of a large green circle"
D = "a white circle and a purple square"
E = "a cyan triangle in the center"
PROMPTS = [A, B, C]


def pngs(out: Path) -> list[Path]:
    return sorted(out.glob("*.png"))


def image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(p + "\n" for p in prompts))
    return path


# ---------------------------------------------------------------------------------------------
# tandem generate: the runs


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """Lazily started ``tandem generate`` runs, by name; each returns its output directory."""
    root = tmp_path_factory.mktemp("generate")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in cache:
            return cache[name]
        world = tiny_world
        out = root / name
        common = ["--model", world, "--mode", "teacher", "--teacher-steps", STEPS]
        if name == "base":  # prompts file, default scheduler and guidance (tandem.json: dpm, 3.0)
            args = ["generate", *common, "--prompts", write_prompts(root / "abc.txt", PROMPTS),
                    "--seed", 0, "--batch-size", 3, "--out", out]
        elif name == "others":  # positional prompts; A and C among other prompts, in batches of 2
            args = ["generate", A, D, C, E, *common, "--seed", 0, "--batch-size", 2, "--out", out]
        elif name == "ddim":
            args = ["generate", *PROMPTS, *common, "--scheduler", "ddim", "--guidance-scale", 1.0,
                    "--seed", 0, "--out", out]
        elif name == "unipc":  # another seed, over a copy of the base run, with fewer prompts
            shutil.copytree(get("base"), out)
            args = ["generate", A, B, *common, "--scheduler", "unipc", "--guidance-scale", 0.5,
                    "--seed", 1, "--overwrite", "--out", out]
        else:
            raise KeyError(name)
        ok(tandem(*args))
        cache[name] = out
        return out

    return get


@pytest.fixture(scope="module")
def reference_images(tiny_world):
    """Images from a plain diffusers call, built the way a reader of the contract would:
    prompt i starts from ``randn`` of a generator seeded with ``prompt_seed(seed, i)``."""
    import torch
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UniPCMultistepScheduler,
    )

    from tandem.generate import prompt_seed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    schedulers = {
        "dpm": DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++"),
        "ddim": DDIMScheduler.from_config(base_config),
        "unipc": UniPCMultistepScheduler.from_config(base_config),
    }

    def make(prompts: list[str], scheduler: str, guidance_scale: float, seed: int) -> list[np.ndarray]:
        pipe.scheduler = schedulers[scheduler]
        generators = [torch.Generator().manual_seed(prompt_seed(seed, i)) for i in range(len(prompts))]
        latents = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance_scale, latents=latents,
                       output_type="np").images
        return [np.asarray(im) for im in pipe.numpy_to_pil(out)]

    yield make
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# tandem generate: the contract


def test_generate_writes_numbered_pngs_records_and_config(runs, tiny_world):
    out = runs("base")
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD, "00000.png", "00001.png", "00002.png",
                                                     "config.json", "records.jsonl"]
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["kind"] == "tandem run" and record["command"] == "generate"
    assert record["files"] == ["00000.png", "00001.png", "00002.png", "config.json", "records.jsonl"]
    for path in pngs(out):
        assert Image.open(path).format == "PNG"
        assert image(path).shape == (32, 32, 3)

    from tandem.generate import prompt_seed

    recs = records(out)
    assert [r["prompt"] for r in recs] == PROMPTS
    assert [r["file"] for r in recs] == ["00000.png", "00001.png", "00002.png"]
    assert [r["prompt_seed"] for r in recs] == [prompt_seed(0, i) for i in range(3)]
    for r in recs:
        assert (r["seed"], r["path"], r["student_score"], r["tau"], r["oracle_calls"]) == (0, "teacher", None, None, 0)
        # guidance 3.0 > 1: conditional + unconditional per step
        assert r["unet_evals"] == {"student": 0.0, "teacher": STEPS * 2.0, "total": STEPS * 2.0}
        assert r["vae"] == {"decode": 1, "encode": 0}

    cfg = config(out)
    assert cfg["teacher"] == {"steps": STEPS, "scheduler": "dpm", "guidance_scale": 3.0}
    assert (cfg["seed"], cfg["batch_size"], cfg["n_prompts"], cfg["mode"]) == (0, 3, 3, "teacher")
    assert Path(cfg["model_path"]) == Path(tiny_world)


RUNS = {  # run: (prompts, scheduler, guidance scale, seed)
    "base": (PROMPTS, "dpm", 3.0, 0),
    "ddim": (PROMPTS, "ddim", 1.0, 0),
    "unipc": ([A, B], "unipc", 0.5, 1),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_generate_png_i_is_prompt_i_as_diffusers_draws_it(runs, reference_images, run):
    prompts, scheduler, guidance_scale, seed = RUNS[run]
    out = runs(run)
    expected = reference_images(prompts, scheduler, guidance_scale, seed)
    for path, want in zip(pngs(out), expected, strict=True):
        np.testing.assert_array_equal(image(path), want, err_msg=f"{run} {path.name}")
    # The match means something: the default sampler, or seed 0, would have drawn other images.
    if scheduler != "dpm":
        default_sampler = reference_images(prompts, "dpm", guidance_scale, seed)
        assert not any(np.array_equal(a, b) for a, b in zip(expected, default_sampler))
    if seed != 0:
        seed_0 = reference_images(prompts, scheduler, guidance_scale, 0)
        assert not any(np.array_equal(a, b) for a, b in zip(expected, seed_0))


@pytest.mark.parametrize("run", ["ddim", "unipc"])
def test_generate_records_the_scheduler_and_unguided_evals(runs, run):
    prompts, scheduler, guidance_scale, seed = RUNS[run]
    out = runs(run)
    assert [(r["prompt"], r["seed"]) for r in records(out)] == [(p, seed) for p in prompts]
    for r in records(out):
        assert r["unet_evals"] == {"student": 0.0, "teacher": float(STEPS), "total": float(STEPS)}  # no CFG branch
    cfg = config(out)
    assert cfg["teacher"] == {"steps": STEPS, "scheduler": scheduler, "guidance_scale": guidance_scale}
    assert cfg["seed"] == seed


def test_generate_same_seed_same_bytes_whatever_the_batch_and_its_other_prompts(runs):
    # base: [A, B, C] in one batch of 3; others: [A, D, C, E] in batches [A, D], [C, E].
    base, others = pngs(runs("base")), pngs(runs("others"))
    assert [r["prompt"] for r in records(runs("others"))] == [A, D, C, E]
    assert [r["unet_evals"]["total"] for r in records(runs("others"))] == [STEPS * 2.0] * 4  # each batch its own
    assert base[0].read_bytes() == others[0].read_bytes()
    assert base[2].read_bytes() == others[2].read_bytes()
    # ... while the prompt that did change (B -> D at index 1) changed its image.
    assert not np.array_equal(image(base[1]), image(others[1]))


def test_generate_overwrite_replaces_all_outputs_of_an_earlier_run(runs):
    out = runs("unipc")  # 2 prompts written over a copy of the 3-prompt base run
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD, "00000.png", "00001.png", "config.json",
                                                     "records.jsonl"]
    for i in range(2):
        assert (out / f"{i:05d}.png").read_bytes() != (runs("base") / f"{i:05d}.png").read_bytes()


def test_generate_refuses_a_non_empty_out_dir(runs, tiny_world, tmp_path):
    out = tmp_path / "earlier"
    shutil.copytree(runs("base"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = tandem("generate", A, "--model", tiny_world, "--teacher-steps", 1, "--out", out)
    assert_user_error(result, str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# tandem generate: bad input. The subprocess case above shows that a refusal reaches the shell as
# exit status 2 and one stderr line; these run ``tandem.cli.main`` in-process (a subprocess costs
# seconds of imports each) and check the same status and line.


@pytest.mark.parametrize("case", ["unknown model", "outside grammar", "steps -1", "steps 0", "batch 0",
                                  "missing file", "unreadable file", "empty file", "no prompts"])
def test_generate_bad_input_is_one_line_and_exit_2(case, tiny_world, tmp_path, capsys, monkeypatch):
    world = tiny_world
    out = tmp_path / "out"
    empty = write_prompts(tmp_path / "empty.txt", ["", "   "])
    args, needles = {
        "unknown model": (["--model", "no-such-model", A], ["unknown model", "no-such-model"]),
        "outside grammar": (["--model", world, A, "a purple hexagon"], ["prompt 1", "grammar", "hexagon"]),
        "steps -1": (["--model", world, "--teacher-steps", -1, A], ["--teacher-steps", "-1"]),
        "steps 0": (["--model", world, "--teacher-steps", 0, A], ["--teacher-steps", "0"]),
        "batch 0": (["--model", world, "--batch-size", 0, A], ["--batch-size", "0"]),
        "missing file": (["--model", world, "--prompts", tmp_path / "nope.txt"], ["nope.txt"]),
        "unreadable file": (["--model", world, "--prompts", tmp_path], [str(tmp_path), "cannot read"]),
        "empty file": (["--model", world, "--prompts", empty], ["empty.txt", "no prompts"]),
        "no prompts": (["--model", world], ["no prompts"]),
    }[case]
    assert_user_error(tandem_in_process(capsys, monkeypatch, "generate", *args, "--out", out), *needles)
    assert not out.exists()  # refused before anything was written


def test_generate_unknown_scheduler_is_one_line_and_exit_2(tiny_world, tmp_path, capsys, monkeypatch):
    result = tandem_in_process(capsys, monkeypatch, "generate", A, "--model", tiny_world,
                               "--scheduler", "euler", "--out", tmp_path / "out")
    assert_user_error(result, "--scheduler", "euler")


# ---------------------------------------------------------------------------------------------
# tandem world render


def _render_prompts() -> list[str]:
    from tandem.world.prompts import load_prompts

    unstated = ["a circle", "a square and a triangle", "a small circle to the left of a triangle",
                "a circle, a square and a triangle", "a large white triangle at the bottom"]
    return unstated + load_prompts("test")[:25]


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    prompts_file = write_prompts(root / "prompts.txt", _render_prompts())
    outs = {}
    for name, seed in (("seed0", 0), ("seed0_again", 0), ("seed1", 1)):
        outs[name] = root / name
        ok(tandem("world", "render", "--prompts", prompts_file, "--seed", seed, "--out", outs[name]))
    return outs


def test_world_render_writes_the_output_contract(renders):
    prompts = _render_prompts()
    out = renders["seed0"]
    names = [f"{i:05d}.png" for i in range(len(prompts))]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [RUN_RECORD, "config.json", "records.jsonl"])
    recs = records(out)
    assert [(r["prompt"], r["file"], r["seed"]) for r in recs] == [(p, n, 0) for p, n in zip(prompts, names)]
    cfg = config(out)
    assert (cfg["seed"], cfg["n_prompts"]) == (0, len(prompts))


@pytest.mark.parametrize("run", ["seed0", "seed1"])
def test_world_render_every_image_satisfies_its_prompt(renders, run):
    for path, prompt in zip(pngs(renders[run]), _render_prompts(), strict=True):
        result = check(image(path), prompt)
        assert result.satisfied, (path.name, prompt, result.problems)
        assert result.score == 1.0


def test_world_render_same_seed_same_bytes_other_seed_other_drawings(renders):
    first, again, other = (pngs(renders[k]) for k in ("seed0", "seed0_again", "seed1"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    n_unstated = 5  # the first prompts leave colour, size or position to chance
    assert any(not np.array_equal(image(a), image(b)) for a, b in zip(first[:n_unstated], other[:n_unstated]))


def test_world_render_rejects_a_prompt_outside_the_grammar(tmp_path, capsys, monkeypatch):
    prompts_file = write_prompts(tmp_path / "p.txt", [A, "a red circle next to a square"])
    result = tandem_in_process(capsys, monkeypatch, "world", "render", "--prompts", prompts_file,
                               "--out", tmp_path / "out")
    assert_user_error(result, "prompt 1", "grammar")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# tandem world prompts


def test_world_prompts_reproduces_the_shipped_test_list_and_refuses_to_overwrite(tmp_path):
    from importlib.resources import files

    shipped = Path(str(files("tandem.world") / "data" / "prompts_test.txt")).read_bytes()
    out = tmp_path / "prompts_test.txt"
    ok(tandem("world", "prompts", "--split", "test", "--n", 1000, "--out", out))
    assert out.read_bytes() == shipped

    out.write_text("keep me\n")
    assert_user_error(tandem("world", "prompts", "--split", "test", "--n", 1000, "--out", out), "--overwrite")
    assert out.read_text() == "keep me\n"
