#!/usr/bin/env bash
# DDIL's Tables 2/3 on the world, trained long enough (issue "Distillation fidelity"): the PD and CD triples of
# run.sh with every training 5x longer, two training seeds, reflection to each latent channel's own measured range
# (`--reflect static`, the default scope; run.sh used the one global range) and DDIL's two-phase schedule (the
# student's share about 15% in the first phase, 80% in the second with half of each batch replayed from the
# DAgger buffer). All variants of a method at equal steps, batch and seed.
# Status: started in session 13 (pd-base and cd-base, training seed 0, one thread each); no result comes from it yet.
#
# 12 trainings of 4000-4500 steps at batch 32, one thread each (estimated 15-20 core-hours, not yet timed): it runs
# across sessions. Each training resumes where its checkpoint stopped (the same command plus --resume, which this
# script adds); a finished run (student/ written) is skipped, as is an evaluation whose results.json exists.
# Run it again until it prints DONE:
#   OMP_NUM_THREADS=1 bash docs/results/ddil_study/run_long.sh
# (two copies at once, with ONLY=pd and ONLY=cd, use both cores; each run needs one).
set -euo pipefail
export OMP_NUM_THREADS=1
R=${RUNS_DIR:-runs/study-long}
ONLY=${ONLY:-}

# progressive: the guidance stage 1500 steps, then rounds 32 -> 16 -> 8 -> 4 of 1000 steps each (run.sh: 300, 200);
# the second phase starts halfway through each round (a round's DDIL steps count from its start)
PD="--guidance-steps 1500 --round-steps 1000 --start-steps 32 --end-steps 4 --batch-size 32 --threads 1 --checkpoint-every 250"
PD_DDIL="frwd=0.75,student=0.25,mixed=0.15,buffer=1024,phase2=500,phase2_student=0.8,replay=0.5"
# consistency: 4000 steps of batch 32 at lr 1e-4, exporting an EMA (0.99) (run.sh: 800); the second phase at 2000
CD="--max-steps 4000 --batch-size 32 --lr 1e-4 --sampling-ema 0.99 --threads 1 --checkpoint-every 250"
CD_DDIL="frwd=0.85,student=0.15,buffer=1024,phase2=2000,phase2_student=0.8,replay=0.5"

train() {  # train METHOD RUN ARGS...: start, resume or skip
  local method=$1 run=$2; shift 2
  [ -d "$R/$run/student" ] && return 0
  local resume=()
  [ -d "$R/$run/checkpoint" ] && resume=(--resume)
  tandem distill "$method" --out "$R/$run" "$@" "${resume[@]}"
}

evaluate() {  # the test prompts, 4 steps, sampling seeds 0 and 1, at the method's guidance chosen on validation
  local run=$1 g=$2
  [ -f "$R/eval/$run-test/results.json" ] || tandem world evaluate --mode student --no-vae \
    --student "$R/$run/student" --student-steps 4 --guidance-scale "$g" --out "$R/eval/$run-test"
  [ -f "$R/eval/$run-test-s1/results.json" ] || tandem world evaluate --mode student --no-vae \
    --student "$R/$run/student" --student-steps 4 --guidance-scale "$g" --seed 1 --out "$R/eval/$run-test-s1"
}

for seed in 0 1; do
  s=$([ $seed = 0 ] && echo "" || echo "-t$seed")
  if [ "$ONLY" != cd ]; then
    train progressive "pd-base$s" $PD --seed $seed
    train progressive "pd-refl$s" $PD --seed $seed --reflect static
    train progressive "pd-refl-ddil$s" $PD --seed $seed --reflect static --ddil "$PD_DDIL"
    for v in base refl refl-ddil; do evaluate "pd-$v$s" 4.5; done
  fi
  if [ "$ONLY" != pd ]; then
    train consistency "cd-base$s" $CD --seed $seed
    train consistency "cd-refl$s" $CD --seed $seed --reflect static
    train consistency "cd-refl-ddil$s" $CD --seed $seed --reflect static --ddil "$CD_DDIL"
    for v in base refl refl-ddil; do evaluate "cd-$v$s" 6; done
  fi
done
echo DONE
