#!/usr/bin/env bash
# The measured acceptance of the adaptive pipeline on ShapesWorld (README, "How well it works"):
# every run on the 1000 fixed test prompts, seed 0, judged by the exact checker. About 15 CPU minutes.
set -x
P=src/tandem/world/data/prompts_test.txt
G="tandem generate --prompts $P --model world --seed 0 --batch-size 100"
$G --mode teacher --teacher-steps 10 --scheduler dpm --out runs/acc/teacher10
$G --mode teacher --teacher-steps 25 --scheduler dpm --out runs/acc/teacher25
$G --mode student --out runs/acc/student4
$G --mode adaptive --budget 20 --strategy refine --rollback-sigma 0.85 --teacher-steps 10 --out runs/acc/adaptive20_refine
$G --mode adaptive --budget 20 --strategy regenerate --teacher-steps 15 --out runs/acc/adaptive20_regen
$G --mode adaptive --budget 30 --strategy regenerate --teacher-steps 15 --out runs/acc/adaptive30_regen
$G --mode adaptive --budget 50 --strategy regenerate --teacher-steps 25 --out runs/acc/adaptive50_regen
$G --mode adaptive --out runs/acc/adaptive_default
for r in student4 adaptive20_refine adaptive20_regen adaptive_default; do tandem world judge runs/acc/$r --against runs/acc/teacher10; done
for r in teacher10 adaptive30_regen adaptive50_regen; do tandem world judge runs/acc/$r --against runs/acc/teacher25; done
tandem world judge runs/acc/teacher25
python3 docs/results/collect_adaptive_world.py runs/acc docs/results/adaptive_world_test.json docs/world_adaptive_quality_vs_cost.png
