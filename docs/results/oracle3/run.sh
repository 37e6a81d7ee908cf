#!/usr/bin/env bash
# Oracle II retrained (issue 17, second round): 4x the data, twice the steps, the shipped architecture and a
# smaller one side by side; then the pipeline measured with it on the very images of the first round's runs
# (docs/results/oracle2/run.sh made them), re-scored with --images-from. 2 CPU cores, one thread per process.
set -euo pipefail
O=runs/oracle3/small/oracle
S="--scorer world-oracle:$O"

# data: 40 training shards of the world stream 101 (124,219 images of 22,691 captions; the first 11 were
# drawn for the first round), the same held-out (102) and calibration (103) shards
tandem world oracle-data --out runs/oracle2/data --train 40 --eval 2 --cal 1
# probes that chose the recipe (1000 steps on 10 shards each, probes.json)
for v in base small rank2 mse20; do python docs/results/oracle3/probe.py $v 1000; done
# the two trainings, side by side (8000 steps of 32 captions with all their images)
tandem world train oracle --out runs/oracle3/big --data runs/oracle2/data --train-shards 40 --max-steps 8000 --threads 1
tandem world train oracle --out runs/oracle3/small --channels 24,48 --width 48 --data runs/oracle2/data \
    --train-shards 40 --max-steps 8000 --threads 1

# the pipeline with it: calibration and cascade table on the 500 validation prompts; the budget curves
# (test and validation) and the no-reference decisions on the first round's images, re-scored
tandem calibrate --model world $S --out runs/oracle3/cal-world.json
tandem calibrate --model world $S --cascade 1 --out runs/oracle3/cascade.json
tandem eval budget --model world $S --calibration runs/oracle3/cal-world.json --cascade runs/oracle3/cascade.json \
    --prompts test --n 500 --images-from runs/oracle2/eval_budget --out runs/oracle3/eval_budget
tandem eval budget --model world $S --calibration runs/oracle3/cal-world.json --prompts val --n 300 \
    --images-from runs/oracle2/budget-val --out runs/oracle3/budget-val
tandem eval budget --model world $S --calibration runs/oracle3/cal-world.json --cascade runs/oracle3/cascade.json \
    --prompts val --n 300 --images-from runs/oracle3/budget-val --out runs/oracle3/budget-val-cascade
tandem eval oracle --model world $S --calibration runs/oracle3/cal-world.json --prompts test \
    --images-from runs/oracle2/eval_oracle --out runs/oracle3/eval_oracle

# shipping: the new oracle as the world's oracle/, every world calibration re-made with it (the calibrate
# commands of the README's "Training the world", --overwrite), the route table from the validation budget
# run and its check on the 1000 test prompts
cp -r $O/. src/tandem/assets/world/oracle/
bash docs/results/oracle3/recalibrate.sh
tandem eval routes runs/oracle3/budget-val --out src/tandem/assets/world/routes.json --overwrite
bash docs/results/oracle2/routes_check.sh runs/routes3
# cost, in one run: the shipped (smaller) oracle beside the larger one, the first release of Oracle II (from git) and the
# first oracle
mkdir -p /tmp/o-s5/tokenizer
for f in config.json model.safetensors tokenizer/tokenizer.json tokenizer/tokenizer_config.json; do
  git show 6bff3ba:src/tandem/assets/world/oracle/$f > /tmp/o-s5/$f
done
python benchmarks/adaptive_overhead.py --threads 1 --also-scorer world-oracle:runs/oracle3/big/oracle \
    --also-scorer world-oracle:/tmp/o-s5 --also-scorer world-oracle:src/tandem/assets/world/oracle-clip \
    --json docs/results/oracle3/overhead.json
for i in 1 2; do   # repeats, the shipped oracle beside the width-64 one
  python benchmarks/adaptive_overhead.py --threads 1 --also-scorer world-oracle:runs/oracle3/big/oracle \
      --json docs/results/oracle3/overhead_repeat$i.json
done
# the three oracles side by side on the very same images
python docs/results/oracle3/side_by_side.py runs/oracle3/eval_budget docs/results/oracle3/side_by_side.json
# the edit experiment with the shipped oracle, and the mask-conditioned one
tandem eval edit --model world --out runs/oracle3/eval_edit
tandem eval control --model world --control mask --out runs/oracle3/eval_control_mask
# the four oracles on one held-out set
python docs/results/oracle3/held_out.py docs/results/oracle3/held_out.json
