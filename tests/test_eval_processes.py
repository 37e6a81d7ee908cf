"""A sweep split across 2 CPU processes with ``accelerate launch`` gives the single-process result,
and a stopped sweep resumes at its first unfinished chunk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow  # 25 s; the default suite keeps test_distill's two-process run and this file's resume test
def test_two_processes_split_a_sweep_and_match_one(tmp_path):
    mode = "student"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launch, str(HERE / "sweep_worker.py"), str(tmp_path / "two"), mode],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(HERE / "sweep_worker.py"), str(tmp_path / "one"), mode],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with np.load(tmp_path / "two" / f"{mode}2.npz") as a, np.load(tmp_path / "one" / f"{mode}2.npz") as b:
        for key in ("satisfied", "score", "evals"):
            assert np.array_equal(a[key], b[key]), key
        # batched CPU kernels may round one 8-bit level differently on a few pixels
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
        np.testing.assert_allclose(a["oracle"], b["oracle"], atol=2e-3)
    assert not list((tmp_path / "two").glob("*.part*.npz"))  # merged and cleaned up


def test_a_stopped_sweep_resumes_at_its_first_unfinished_chunk(tmp_path, monkeypatch):
    from worldtools import PROMPTS, world_pipeline

    from tandem.eval.sweep import SamplerConfig, Sweep

    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_steps=3, teacher_guidance_scale=4.5)
    calls = []

    def stop_after_two(indices, prompts, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(list(indices))
        return pipe(prompts, **kwargs)

    config = SamplerConfig("student", 2)
    with pytest.raises(KeyboardInterrupt):
        Sweep(pipe, PROMPTS, 5, tmp_path, batch_size=2, call=stop_after_two).run(config)
    assert calls == [[0, 1], [2, 3]] and len(list(tmp_path.glob("*.part*.npz"))) == 2
    calls.clear()
    resumed = Sweep(pipe, PROMPTS, 5, tmp_path, batch_size=2,
                    call=lambda idx, p, **kw: calls.append(list(idx)) or pipe(p, **kw)).run(config)
    assert calls == [[4, 5]]
    fresh = Sweep(pipe, PROMPTS, 5, tmp_path / "fresh", batch_size=2).run(config)
    assert np.array_equal(resumed["images"], fresh["images"])
