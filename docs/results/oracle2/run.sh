#!/usr/bin/env bash
# Oracle II (issue 17): its data, training, calibration and evaluation, and the pipeline measured with it.
# Run on 2 CPU cores (one thread per process); every step resumes or reuses what an earlier call made.
set -euo pipefail
O=runs/oracle2/run/oracle
S="--scorer world-oracle:$O"

# data: held-out (stream 102) and calibration (103) shards, then 10 training shards (stream 101) of ~3,100
# images each (the 4-step, 2-step and 1-step student, the teacher at 5/10/25 steps, refinements at rollback
# 0.3/0.5/0.7, ControlNet generations, the rendering and two targeted corruptions of each caption, and 250
# student edits per shard), labelled by the exact checker; more shards: --train N (only missing ones are drawn)
tandem world oracle-data --out runs/oracle2/data --train 10 --eval 2 --cal 1
# training (4000 steps of 32 captions with all their images), Platt scaling on the calibration shard, the
# held-out report (eval.json, the first oracle beside it on the same images)
tandem world train oracle --out runs/oracle2/run --data runs/oracle2/data --train-shards 10 --max-steps 4000 --threads 1

# the pipeline with it: a calibration on the 500 validation prompts, a cascade table (1-step student first),
# its cost beside the first oracle's on the same images, the no-reference decisions (Fig. 7) on the test prompts
tandem calibrate --model world $S --out runs/oracle2/cal-world.json
tandem calibrate --model world $S --cascade 1 --out runs/oracle2/cascade.json
python benchmarks/adaptive_overhead.py --threads 1 --also-scorer world-oracle:$O --json runs/oracle2/overhead.json
tandem eval oracle --model world $S --calibration runs/oracle2/cal-world.json --prompts test --out runs/oracle2/eval_oracle
tandem eval oracle --model world --prompts test --out runs/oracle2/eval_oracle_first     # the first oracle, same runs
# the budget curves on 500 test prompts, with the cascade as its own curve
tandem eval budget --model world $S --calibration runs/oracle2/cal-world.json --cascade runs/oracle2/cascade.json \
    --prompts test --n 500 --out runs/oracle2/eval_budget
# Oracle II beside the first oracle on the same cached images, each operating point chosen on validation
tandem eval budget --model world $S --calibration runs/oracle2/cal-world.json --prompts val --n 300 --out runs/oracle2/budget-val
# side_by_side.json was made by this round's side_by_side.py, since generalised to three oracles
# (docs/results/oracle3/side_by_side.py): its entries oracle_ii_first_release and first_oracle in
# docs/results/oracle3/side_by_side.json are this file's two oracles, on the same images
# (the first oracle's validation run is the one its route table came from: docs/results/routes_world/run.sh)

# shipping: Oracle II as the world's oracle/ (the first as oracle-clip/), the world's calibrations and route table
# re-made with it (the calibrate commands of the README's "Training the world", --overwrite)
tandem eval routes runs/oracle2/budget-val --out src/tandem/assets/world/routes.json --overwrite
bash docs/results/oracle2/routes_check.sh runs/routes2   # the route table's check on the test prompts (as in docs/results/routes_world)
