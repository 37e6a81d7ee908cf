"""Oracle II probes: short trainings on the first 10 training shards, one change from the shipped recipe
each, compared on the held-out captions unseen in training (probes.json).

    python docs/results/oracle3/probe.py base 1000   # -> runs/oracle3/probe-base-1000/oracle/eval.json
"""

from __future__ import annotations

import sys

import torch

from tandem.world.oracle_net import NetArch
from tandem.world.oracle_train import OracleNetTrainConfig, train_oracle_net

VARIANTS = {
    "base": {},
    "small": {"arch": NetArch(channels=(24, 48), width=48)},
    "rank2": {"rank_weight": 2.0},
    "mse20": {"mse_weight": 20.0},
}

if __name__ == "__main__":
    name, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = OracleNetTrainConfig(data="runs/oracle2/data", shards={"train": 10, "eval": 2, "cal": 1},
                               max_steps=steps, checkpoint_every=500, **VARIANTS[name])
    train_oracle_net(f"runs/oracle3/probe-{name}-{steps}", cfg)
