#!/bin/bash
# the world route table (re-made with Oracle II) checked on the 1000 test prompts, as docs/results/routes_world/run.sh did

export OMP_NUM_THREADS=1
for B in 15 50; do
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --mode adaptive --budget $B \
    --seed 0 --batch-size 100 --out runs/routes2/budget$B-routes --overwrite > /dev/null
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --mode adaptive --budget $B \
    --strategy refine --seed 0 --batch-size 100 --out runs/routes2/budget$B-preset --overwrite > /dev/null
  tandem world judge runs/routes2/budget$B-preset | tail -1
  tandem world judge runs/routes2/budget$B-routes --against runs/routes2/budget$B-preset | tail -2
done
echo DONE-ROUTES
