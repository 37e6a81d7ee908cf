#!/bin/bash
# issue 16: training seed 1 of the PD and CD triples (same commands as run.sh, --seed 1), each evaluated at sampling seeds 0 and 1
# Ran: pd-base-t1, cd-base-t1, pd-refl-ddil-t1, cd-refl-ddil-t1 (session 5). Not yet: pd-refl-t1 (stopped early; add
# --resume to continue it from runs/study/pd-refl-t1) and cd-refl-t1. Then measure.py as in run.sh.
set -x
export OMP_NUM_THREADS=1

T="tandem distill"
PD="--guidance-steps 300 --round-steps 200 --start-steps 32 --end-steps 4 --batch-size 32 --threads 1 --checkpoint-every 100 --seed 1"
CD="--max-steps 800 --batch-size 32 --lr 1e-4 --sampling-ema 0.99 --threads 1 --checkpoint-every 100 --seed 1"
ev() { r=$1; g=$2
  tandem world evaluate --mode student --no-vae --student runs/study/$r/student --student-steps 4 --guidance-scale $g --out runs/study/eval/$r-test
  tandem world evaluate --mode student --no-vae --student runs/study/$r/student --student-steps 4 --guidance-scale $g --seed 1 --out runs/study/eval/$r-test-s1; }
$T progressive --out runs/study/pd-base-t1 $PD; ev pd-base-t1 4.5
$T consistency --out runs/study/cd-base-t1 $CD; ev cd-base-t1 6
$T progressive --out runs/study/pd-refl-ddil-t1 $PD --reflect static:global --ddil "frwd=0.75,student=0.25,mixed=0.15,buffer=1024"; ev pd-refl-ddil-t1 4.5
$T consistency --out runs/study/cd-refl-ddil-t1 $CD --reflect static:global --ddil "frwd=0.5,student=0.5"; ev cd-refl-ddil-t1 6
$T progressive --out runs/study/pd-refl-t1 $PD --reflect static:global; ev pd-refl-t1 4.5
$T consistency --out runs/study/cd-refl-t1 $CD --reflect static:global; ev cd-refl-t1 6
echo DONE-SEED1
