"""What the distillation methods' tests share: caption embeddings by hand, and the check that a 2-process
run makes the updates of one process accumulating two micro-batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def encode_text(teacher, captions: list[str]) -> torch.Tensor:
    """The teacher text encoder's token states [B, L, D] for ``captions``, padded to the tokenizer's length."""
    ids = teacher.tokenizer(captions, padding="max_length", max_length=teacher.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return teacher.text_encoder(ids)[0]


def assert_ddp_matches_accumulation(args: list[str], out, networks: tuple[str, ...]) -> None:
    """Run ``tandem ARGS`` on 2 processes (gloo, torchrun) and on 1 with ``--grad-accum 2``; every network in
    ``networks`` ends with the same weights in both checkpoints."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TANDEM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "tandem.cli", *args, "--out", str(out / "ddp")],
                         check=False, env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    acc = subprocess.run([sys.executable, "-m", "tandem.cli", *args, "--grad-accum", "2", "--out", str(out / "accum")],
                         check=False, env=env, capture_output=True, text=True)
    assert acc.returncode == 0, acc.stderr[-3000:]
    states = [torch.load(out / run / "checkpoint" / "state.pt", weights_only=True)["models"] for run in ("ddp", "accum")]
    for name in networks:
        for k, v in states[0][name].items():
            torch.testing.assert_close(v, states[1][name][k], rtol=1e-4, atol=1e-6)
