#!/usr/bin/env bash
# DDIL's Table 2/3 on the world (issue 16): every method trained from the shipped teacher at equal steps and
# batch, as a baseline, + reflected (static clipping to the measured latent range) and + reflected + DDIL;
# one training seed (0); the 1000 test prompts judged at sampling seeds 0 and 1, at the guidance chosen on the
# validation prompts for the shipped student of the same method. Run on 2 CPU cores, two trainings at a time.
set -euo pipefail
T="tandem distill"

# progressive: guidance stage 300 steps, then rounds 32 -> 16 -> 8 -> 4 of 200 steps each (batch 32)
PD="--guidance-steps 300 --round-steps 200 --start-steps 32 --end-steps 4 --batch-size 32 --threads 1 --checkpoint-every 100"
$T progressive --out runs/study/pd-base $PD
$T progressive --out runs/study/pd-refl $PD --reflect static:global
$T progressive --out runs/study/pd-refl-ddil $PD --reflect static:global --ddil "frwd=0.75,student=0.25,mixed=0.15,buffer=1024"

# consistency: 800 steps of batch 32 at lr 1e-4, exporting an EMA (0.99): the shipped cd's recipe
CD="--max-steps 800 --batch-size 32 --lr 1e-4 --sampling-ema 0.99 --threads 1 --checkpoint-every 100"
$T consistency --out runs/study/cd-base $CD
$T consistency --out runs/study/cd-refl $CD --reflect static:global
$T consistency --out runs/study/cd-refl-ddil $CD --reflect static:global --ddil "frwd=0.5,student=0.5"

# DMD2 at batch 7 (the paper's small-batch experiment): 500 critic steps (100 student updates)
DS="--max-steps 500 --batch-size 7 --threads 1 --checkpoint-every 100"
$T dmd2 --out runs/study/dmd2-b7-base $DS
$T dmd2 --out runs/study/dmd2-b7-refl $DS --reflect static:global
$T dmd2 --out runs/study/dmd2-b7-refl-ddil $DS --reflect static:global --ddil "frwd=0.25,teacher=0.25,student=0.5,mixed=0.5"
# (DMD2 at batch 32 and 1000 steps was started for the three variants and stopped: at 5-9 s per step on the
# shared cores it would not finish in the session.)

# the test prompts, 4 steps, sampling seeds 0 and 1
for r in pd-base pd-refl pd-refl-ddil cd-base cd-refl cd-refl-ddil dmd2-b7-base dmd2-b7-refl dmd2-b7-refl-ddil; do
  case $r in pd-*) g=4.5;; cd-*) g=6;; *) g=1;; esac
  tandem world evaluate --mode student --no-vae --student runs/study/$r/student --student-steps 4 --guidance-scale $g \
    --out runs/study/eval/$r-test
  tandem world evaluate --mode student --no-vae --student runs/study/$r/student --student-steps 4 --guidance-scale $g \
    --seed 1 --out runs/study/eval/$r-test-s1
done

# the covariate-shift study (Table 7) for the consistency students, then everything collected
bash docs/results/ddil_study/table7.sh cd-base cd-refl-ddil
python docs/results/ddil_study/measure.py runs/study runs/study/eval docs/results/ddil_study
