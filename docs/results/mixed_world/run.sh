#!/usr/bin/env bash
# The covariate-shift study on ShapesWorld (DDIL Table 7): a 4-step student whose transitions the 32-step
# teacher (guided DDIM, 8 sub-steps each) takes with probability p_T; the 1000 test prompts, seed 0, exact
# checker. Usage: bash docs/results/mixed_world/run.sh cd|pd  (about 8 CPU minutes each at one thread)
set -e
S=$1
for p in 0 0.25 0.5 0.75 1; do
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --student $S --seed 0 --batch-size 100 --mode mixed --teacher-prob $p --out runs/mx/$S-p$p > /dev/null 2>&1
  tandem world judge runs/mx/$S-p$p | tail -1
done
