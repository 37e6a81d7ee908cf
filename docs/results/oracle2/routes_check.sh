#!/bin/bash
# the world route table (re-made with Oracle II) checked on the 1000 test prompts, as docs/results/routes_world/run.sh did
# $1: where the runs go [runs/routes2]
OUT=${1:-runs/routes2}

export OMP_NUM_THREADS=1
for B in 15 50; do
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --mode adaptive --budget $B \
    --seed 0 --batch-size 100 --out $OUT/budget$B-routes --overwrite > /dev/null
  tandem generate --prompts src/tandem/world/data/prompts_test.txt --model world --mode adaptive --budget $B \
    --strategy refine --seed 0 --batch-size 100 --out $OUT/budget$B-preset --overwrite > /dev/null
  tandem world judge $OUT/budget$B-preset | tail -1
  tandem world judge $OUT/budget$B-routes --against $OUT/budget$B-preset | tail -2
done
echo DONE-ROUTES
