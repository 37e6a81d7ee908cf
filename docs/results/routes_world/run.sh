#!/usr/bin/env bash
# The world's route table (what `tandem generate --mode adaptive --budget B` alone picks) and its check on
# the test prompts: a budget alone against the same budget with the preset's own settings (refine, sigma
# 0.7, 10 teacher steps; k from the cost formula), which an explicit --strategy refine keeps.
set -e
tandem eval budget --model world --prompts val --n 300 --out runs/eval/budget-val-pd
tandem eval routes runs/eval/budget-val-pd --out src/tandem/assets/world/routes.json
# (the world preset names it: routes="world:routes.json" in tandem.presets)
for B in 15 50; do
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --mode adaptive --budget $B \
    --seed 0 --batch-size 100 --out runs/routes/budget$B-routes > /dev/null
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --mode adaptive --budget $B \
    --strategy refine --seed 0 --batch-size 100 --out runs/routes/budget$B-preset > /dev/null
  tandem world judge runs/routes/budget$B-preset | tail -1
  tandem world judge runs/routes/budget$B-routes --against runs/routes/budget$B-preset | tail -2
done
