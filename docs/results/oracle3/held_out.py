"""The world's oracles on one held-out set: the 2 held-out shards (stream 102) less every caption the 40
training shards hold (what `tandem world train oracle` reports for the oracle it trains, here for all four).

    python docs/results/oracle3/held_out.py docs/results/oracle3/held_out.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

DATA = Path("runs/oracle2/data")
WORLD = "src/tandem/assets/world"
ORACLES = {"oracle_ii_small (shipped)": "runs/oracle3/small/oracle", "oracle_ii_large": "runs/oracle3/big/oracle",
           "oracle_ii_first_release": "6bff3ba", "first_oracle": f"{WORLD}/oracle-clip"}
FILES = ("config.json", "model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")


def from_git(commit: str) -> Path:
    path = Path(tempfile.mkdtemp())
    for file in FILES:
        (path / file).parent.mkdir(parents=True, exist_ok=True)
        (path / file).write_bytes(subprocess.run(["git", "show", f"{commit}:{WORLD}/oracle/{file}"],
                                                 capture_output=True, check=True).stdout)
    return path


def main(out: Path) -> None:
    from tandem.world.oracle import WorldOracleScorer
    from tandem.world.oracle_data import load_shards
    from tandem.world.oracle_train import evaluate

    torch.set_num_threads(1)
    held = load_shards(sorted((DATA / "eval").glob("shard-*.npz")))
    seen = set(load_shards(sorted((DATA / "train").glob("shard-*.npz"))[:40])["captions"].tolist())
    unseen = np.array([c not in seen for c in held["captions"]])[held["group"]]
    captions = held["captions"][held["group"]].tolist()
    report = {"held_out": "runs/oracle2/data/eval (stream 102), captions of the 40 training shards left out",
              "oracles": {}}
    for name, where in ORACLES.items():
        path = Path(where) if Path(where).exists() else from_git(where)
        scores = WorldOracleScorer.from_pretrained(path)(held["images"], captions).numpy()
        report["oracles"][name] = {"path": where, **evaluate(scores, held, unseen)}
        r = report["oracles"][name]
        print(f"{name}: AUC student4 {r['auc']['student4']:.3f} edit {r['auc']['edit']:.3f} control "
              f"{r['auc']['control']:.3f}, pairwise {r['pairwise_student4_vs_teacher']:.3f}")
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
