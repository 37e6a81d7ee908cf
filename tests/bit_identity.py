"""The shipped world's outputs, reduced to one digest per command: the pixels of every image and every
number a run records, without timings and paths. `tests/test_bit_identity.py` compares them with
`tests/data/bit_identity.json`, recorded by `python tests/bit_identity.py --record` on the code
before the pipeline was split into stages (commit c9443d9): a move must not change one pixel. One digest was
re-recorded on purpose since, for a change of behaviour: generate-budget-routes, when route tables came to take the
cheapest route within one standard error of the best (at budget 8 the world's table now takes the student alone,
its records' tau null). On 2026-12-07 every digest was recorded again, on the last landed commit (a5e232c), because
package releases since had moved 15 of them (diffusers 0.42.1, transformers 5.25.0, numpy 2.4.6, torch 2.13.0 CPU;
CI now installs exactly these: .ci/constraints.txt); then, on purpose, generate-budget-routes (the world's route table
now draws drafts: two at budget 8), eval-budget (its points record win rates), calibrate and calibrate-cascade (a
calibration's config lists the preset's new fields, its scores unchanged). Numbers in records
and results are compared to 10 significant digits: a statistic over images (a Fréchet distance) changes in its
last digits with the number of BLAS threads.

The digests are kept per CPU kernel set (``torch.backends.cpu.get_cpu_capability()``): the same code, packages and
thread count give other float results on a machine with AVX-512 than on one with AVX2 only, whose kernels sum in
another order. The set recorded on 2026-12-07 (above) came from a machine whose kernel set was not written down;
an AVX2-only machine gave other digests for every case on that commit, so it is filed as AVX512. The AVX2 set was
recorded on 2026-12-07 too (session 12), on commit 7116764's code. A machine whose kernel set has no digests skips
the comparison, saying so; `--record` writes its set beside the others."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIGESTS = Path(__file__).parent / "data" / "bit_identity.json"

PROMPTS = ["a red circle", "a small blue square at the top left",
           "an orange triangle to the left of a large green circle", "a purple square below a yellow circle",
           "a large cyan triangle", "a green circle above a small red square"]

# name -> arguments after the command's output directory; '{control}' is replaced by control image files.
CASES: dict[str, list[str]] = {
    "generate-teacher": ["generate", *PROMPTS, "--mode", "teacher"],
    "generate-student": ["generate", *PROMPTS, "--mode", "student"],
    "generate-adaptive": ["generate", *PROMPTS, "--mode", "adaptive"],
    "generate-regenerate-threshold": ["generate", *PROMPTS, "--mode", "adaptive", "--strategy", "regenerate",
                                      "--threshold", "0.8"],
    "generate-pixel-handoff": ["generate", *PROMPTS, "--mode", "adaptive", "--handoff", "pixel",
                               "--rollback-convention", "strength", "--percentile", "70"],
    "generate-budget": ["generate", *PROMPTS, "--mode", "adaptive", "--budget", "8", "--rollback-sigma", "0.7"],
    "generate-budget-routes": ["generate", *PROMPTS, "--mode", "adaptive", "--budget", "8"],
    "generate-budget-exact": ["generate", *PROMPTS, "--mode", "adaptive", "--budget", "8", "--budget-exact"],
    "generate-refine-all": ["generate", *PROMPTS, "--mode", "refine-all", "--batch-size", "4"],
    "generate-mixed": ["generate", *PROMPTS, "--mode", "mixed", "--teacher-prob", "0.5"],
    "generate-mixed-at": ["generate", *PROMPTS, "--mode", "mixed", "--teacher-at", "999"],
    "generate-control": ["generate", *PROMPTS, "--mode", "adaptive", "--control", "mask", "{control}"],
    "generate-cd-student": ["generate", *PROMPTS, "--mode", "adaptive", "--student", "cd"],
    "edit": ["edit", "--edits", "test", "--n", "6", "--batch-size", "4"],
    "calibrate": ["calibrate", "--prompts", "{prompts}", "--batch-size", "4"],
    "calibrate-cascade": ["calibrate", "--prompts", "{prompts}", "--cascade", "1", "--cascade", "2"],
    "generate-cascade": ["generate", *PROMPTS, "--mode", "adaptive", "--budget", "6", "--cascade", "{cascade}"],
    "eval-budget": ["eval", "budget", "--prompts", "val", "--n", "6", "--batch-size", "6"],
}

# Keys whose values differ between two runs of one command: timings, paths, versions.
VARYING = {"time", "seconds", "timings", "wall_seconds", "file", "path", "out", "command", "tandem_version",
           "created", "finished", "cache", "control_image", "prompts_file", "image_file", "input"}
ROUTES = {"accepted", "refined", "regenerated", "student", "teacher", "improved"}


def _strip(value):
    """Drop what differs between runs of one command (timings, paths) and keep every other number."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items())
                if k not in VARYING or (k == "path" and v in ROUTES)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, float):  # statistics over images (a Fréchet distance) vary in the last digits with BLAS
        return float(f"{value:.10g}")  # threads; pixels and scores agree to many more digits than these
    return value


def digest_dir(out: Path) -> str:
    h = hashlib.sha256()
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    for path in files:
        rel = path.name if out.is_file() else str(path.relative_to(out))
        if rel.startswith(".") or "/cache/" in f"/{rel}" or rel in ("config.json", "report.md"):
            continue
        if path.suffix == ".png":
            h.update(rel.encode())
            h.update(np.asarray(Image.open(path).convert("RGB")).tobytes())
        elif path.suffix == ".jsonl":
            h.update(rel.encode())
            for line in path.read_text().splitlines():
                h.update(json.dumps(_strip(json.loads(line)), sort_keys=True).encode())
        elif path.suffix == ".json":
            h.update(rel.encode())
            h.update(json.dumps(_strip(json.loads(path.read_text())), sort_keys=True).encode())
    return h.hexdigest()


def arguments(name: str, work: Path) -> tuple[list[str], Path]:
    from tandem.world.conditional import scenes_for_captions
    from tandem.world.control import control_image

    args = list(CASES[name])
    out = work / name
    expanded: list[str] = []
    for a in args:
        if a == "{control}":
            for i, scene in enumerate(scenes_for_captions(PROMPTS, 0)):
                path = work / f"mask{i}.png"
                Image.fromarray(control_image(scene, "mask")).save(path)
                expanded += ["--control-image", str(path)]
        elif a == "{cascade}":
            expanded.append(str(work / "calibrate-cascade.json"))
        elif a == "{prompts}":
            path = work / "prompts.txt"
            path.write_text("\n".join(PROMPTS) + "\n")
            expanded.append(str(path))
        else:
            expanded.append(a)
    if args[0] == "calibrate":
        out = work / f"{name}.json"
    return [*expanded, "--out", str(out)], out


def cpu_capability() -> str:
    """The CPU kernel set torch runs here ('AVX512', 'AVX2', ...): the key of this machine's digests."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def recorded_digests() -> dict[str, str] | None:
    """The digests recorded for this machine's CPU kernel set, or None if none were."""
    return json.loads(DIGESTS.read_text()).get(cpu_capability())


def run_case(name: str, work: Path) -> str:
    from tandem.cli import main

    args, out = arguments(name, work)
    argv = sys.argv
    sys.argv = ["tandem", *args]
    try:
        main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise RuntimeError(f"{name}: tandem {' '.join(args)} exited {stop.code}") from None
    finally:
        sys.argv = argv
    return digest_dir(out)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import os
    import tempfile

    import torch

    os.environ["TANDEM_PROGRESS"] = "0"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        digests = {name: run_case(name, Path(tmp)) for name in CASES}
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {}
    recorded[cpu_capability()] = digests
    DIGESTS.parent.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(cpu_capability(), json.dumps(digests, indent=1))
