#!/bin/bash
# The world's progressive and knowledge-distilled students (issue 14): the trainings and every
# evaluation behind the README's student table, in the order they were run (2 CPU cores).
# Settings are chosen on the 500 validation prompts; the 1000 test prompts only report.
set -euo pipefail
VAL=src/tandem/world/data/prompts_val.txt

# -- trainings --------------------------------------------------------------------------------------
# progressive: guidance stage (600 steps), then rounds 32 -> 16 -> 8 -> 4 -> 2 -> 1 (400 steps each)
tandem distill progressive --out runs/pd --guidance-steps 600 --round-steps 400 --start-steps 32 --end-steps 1 \
    --batch-size 32 --threads 2
# knowledge distillation into half and quarter width, and the same half-width UNet from scratch (DSM, Eq. 3)
tandem distill knowledge --out runs/kd-half --arch half --batch-size 64 --max-steps 3000 --threads 1 --checkpoint-every 250
tandem distill knowledge --out runs/dsm-half --arch half --alpha 1 --batch-size 64 --max-steps 3000 --threads 1 --checkpoint-every 250
tandem distill knowledge --out runs/kd-quarter --arch quarter --batch-size 64 --max-steps 3000 --threads 1 --checkpoint-every 250
# (pd ran its first 500 steps at --threads 2, then resumed at --threads 1 with --resume; kd-half,
# dsm-half and kd-quarter ran two at a time, one thread each.)

# -- guidance on the validation prompts ----------------------------------------------------------------
E="tandem world evaluate --mode student --no-vae"
$E --student runs/pd/rounds/4-steps --student-steps 4 --guidance-scale 3 --guidance-scale 4.5 --guidance-scale 6 --guidance-scale 8 --prompts $VAL --out runs/eval/pd4-val
for n in 1 2 8; do
  $E --student runs/pd/rounds/$n-steps --student-steps $n --guidance-scale 3 --guidance-scale 4.5 --guidance-scale 6 --prompts $VAL --out runs/eval/pd$n-val
done
for r in kd-half dsm-half kd-quarter; do
  $E --student runs/$r/student --student-steps 25 --guidance-scale 4 --guidance-scale 5 --guidance-scale 6 --prompts $VAL --out runs/eval/$r-val
done

# -- the test prompts, at the chosen scales ------------------------------------------------------------
$E --student runs/pd/rounds/1-steps --student-steps 1 --guidance-scale 4.5 --out runs/eval/pd1-test
$E --student runs/pd/rounds/2-steps --student-steps 2 --guidance-scale 6 --out runs/eval/pd2-test
$E --student runs/pd/rounds/4-steps --student-steps 4 --guidance-scale 4.5 --out runs/eval/pd4-test
$E --student runs/pd/rounds/8-steps --student-steps 8 --guidance-scale 3 --out runs/eval/pd8-test
$E --student runs/kd-half/student --student-steps 10 --student-steps 25 --guidance-scale 4 --out runs/eval/kd-half-test
$E --student runs/dsm-half/student --student-steps 10 --student-steps 25 --guidance-scale 5 --out runs/eval/dsm-half-test
$E --student runs/kd-quarter/student --student-steps 10 --student-steps 25 --guidance-scale 4 --out runs/eval/kd-quarter-test
tandem world evaluate --mode teacher --teacher-steps 10 --guidance-scale 5 --no-vae --out runs/eval/teacher10-test
tandem world evaluate --mode teacher --teacher-steps 25 --guidance-scale 5 --no-vae --out runs/eval/teacher25-test

# -- the adaptive pipeline with pd instead of cd, on the validation prompts -----------------------------
tandem calibrate --model world --student pd --prompts $VAL --out runs/eval/cal-pd.json
G="tandem generate --prompts $VAL --model world --seed 0 --batch-size 100 --mode adaptive"
$G --out runs/eval/ad-cd-val
$G --student pd --calibration runs/eval/cal-pd.json --out runs/eval/ad-pd-val
tandem world judge runs/eval/ad-cd-val; tandem world judge runs/eval/ad-pd-val

# -- ship, collect -------------------------------------------------------------------------------------
tandem world add-student --student runs/pd/rounds/4-steps --name pd --steps 4 --guidance-scale 4.5 --evaluation runs/eval/pd4-test/results.json --evaluation runs/eval/pd4-val/results.json
tandem world add-student --student runs/pd/rounds/2-steps --name pd-2 --steps 2 --guidance-scale 6 --evaluation runs/eval/pd2-test/results.json --evaluation runs/eval/pd2-val/results.json
tandem world add-student --student runs/pd/rounds/1-steps --name pd-1 --steps 1 --guidance-scale 4.5 --evaluation runs/eval/pd1-test/results.json --evaluation runs/eval/pd1-val/results.json
tandem world add-student --student runs/kd-half/student --name kd-half --steps 25 --guidance-scale 4 --evaluation runs/eval/kd-half-test/results.json --evaluation runs/eval/kd-half-val/results.json
tandem world add-student --student runs/dsm-half/student --name dsm-half --steps 25 --guidance-scale 5 --evaluation runs/eval/dsm-half-test/results.json --evaluation runs/eval/dsm-half-val/results.json
tandem world add-student --student runs/kd-quarter/student --name kd-quarter --steps 25 --guidance-scale 4 --evaluation runs/eval/kd-quarter-test/results.json --evaluation runs/eval/kd-quarter-val/results.json
python docs/results/students/collect.py runs/eval docs/results/students

# -- session 3: DMD2 and ADD (issue 15), a wider KD student (in progress) --------------------------------
tandem distill dmd2 --out runs/dmd2 --batch-size 32 --max-steps 1000 --threads 1 --checkpoint-every 250
$E --student runs/dmd2/student --student-steps 1 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/dmd2-1000-val
tandem distill dmd2 --out runs/dmd2 --batch-size 32 --max-steps 3000 --threads 1 --checkpoint-every 250 --resume
$E --student runs/dmd2/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/dmd2-3000-val
tandem distill adversarial --out runs/add --batch-size 32 --max-steps 750 --lr 5e-5 --threads 1 --checkpoint-every 250
cp -r runs/add/student runs/snap/add-750
$E --student runs/snap/add-750 --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/add-750-val
tandem distill adversarial --out runs/add --batch-size 32 --max-steps 1500 --lr 5e-5 --threads 1 --checkpoint-every 250 --resume
$E --student runs/add/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/add-1500-val
# the test prompts, for the checkpoints chosen on validation (dmd2: 3000; add: 750)
$E --student runs/dmd2/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --out runs/eval/dmd2-test
$E --student runs/snap/add-750 --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --out runs/eval/add-test
tandem world add-student --student runs/dmd2/student --name dmd2 --steps 4 --guidance-scale 1 --evaluation runs/eval/dmd2-test/results.json --evaluation runs/eval/dmd2-3000-val/results.json
tandem world add-student --student runs/snap/add-750 --name add --steps 4 --guidance-scale 1 --evaluation runs/eval/add-test/results.json --evaluation runs/eval/add-750-val/results.json
python docs/results/students/collect.py docs/results/students/evaluations docs/results/students

# knowledge distillation at 48% of the teacher's FLOPs per call (stopped at 2500 steps; resume with the same
# command plus --resume). Mid-run validation (kd-44-2250-val.json) from its checkpoint's EMA weights.
tandem distill knowledge --out runs/kd-44 --arch custom --channels 44,88,88 --batch-size 64 --max-steps 12000 --threads 1 --checkpoint-every 250

# -- session 7: ADD as the paper builds it (issue "Distillation fidelity"): the first release's command, the fixed
# method's defaults, 750 steps at two threads; shipped as add (the first release's evaluations stay as add-test.json
# and add-750-val.json)
tandem distill adversarial --out runs/add-fixed --batch-size 32 --max-steps 750 --lr 5e-5 --threads 2 --checkpoint-every 250
$E --student runs/add-fixed/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/add-fixed-750-val
$E --student runs/add-fixed/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --out runs/eval/add-fixed-750-test
tandem world add-student --student runs/add-fixed/student --name add --steps 4 --guidance-scale 1 --evaluation runs/eval/add-fixed-750-test/results.json --evaluation runs/eval/add-fixed-750-val/results.json --overwrite
tandem calibrate --model world --student add --out /tmp/calibration-add.json
tandem world add-calibration --student add --calibration /tmp/calibration-add.json --overwrite
python docs/results/students/collect.py docs/results/students/evaluations docs/results/students
# ablation: the fixed ADD on the first release's zero-SNR v-schedule (validation only)
tandem distill adversarial --out runs/add-fixed-zero-snr --student-schedule zero-snr --batch-size 32 --max-steps 750 --lr 5e-5 --threads 2 --checkpoint-every 250
$E --student runs/add-fixed-zero-snr/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/add-fixed-zero-snr-750-val
# session 12: an EMA of the student (0.99), and the discriminator's real images as VAE reconstructions
# (decode(encode(x0)), as the fakes are decoded), each 750 steps at one thread beside the KD run (about 52 minutes
# each); raw_student.py writes the same run's student without its EMA (from its last checkpoint)
tandem distill adversarial --out runs/add-ema --batch-size 32 --max-steps 750 --lr 5e-5 --threads 1 --checkpoint-every 250 --snapshot-every 250 --ema 0.99
python docs/results/students/raw_student.py runs/add-ema runs/add-ema-raw
tandem distill adversarial --out runs/add-vae --real-images vae --batch-size 32 --max-steps 750 --lr 5e-5 --threads 1 --checkpoint-every 250 --snapshot-every 250 --ema 0.99
python docs/results/students/raw_student.py runs/add-vae runs/add-vae-raw
for r in add-ema/student add-ema-raw add-vae/student add-vae-raw; do
  n=${r%/student}
  $E --student runs/$r --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/$n-750-val
done

# -- session 7: KD to the teacher's sample budget (issue "Distillation fidelity"), in progress ----------------
# kd-half and its DSM baseline at the teacher's 13,850 steps of batch 64 and its schedule's shape (three stages),
# snapshots every 1000 steps for the accuracy-against-steps view. Each run resumes with the same command plus
# --resume (a staged run keeps its --max-steps: the stages' sum).
STAGES=7250:constant:1:500,3600:cosine:0.5:100,3000:cosine:0.2:100
tandem distill knowledge --out runs/kd-half-long --arch half --batch-size 64 --lr-stages $STAGES --threads 1 --checkpoint-every 250 --snapshot-every 1000
tandem distill knowledge --out runs/dsm-half-long --arch half --alpha 1 --batch-size 64 --lr-stages $STAGES --threads 1 --checkpoint-every 250 --snapshot-every 1000
# mid-run validation of kd-half-long's snapshots (25 steps, guidance 4, kd-half's): step 1000 0.2%, step 2000 19.4%
$E --student runs/kd-half-long/snapshots/step-1000 --student-steps 25 --guidance-scale 4 --prompts $VAL --out runs/eval/kd-half-long-1000-val
$E --student runs/kd-half-long/snapshots/step-2000 --student-steps 25 --guidance-scale 4 --prompts $VAL --out runs/eval/kd-half-long-2000-val
# session 11: dsm-half-long trained again from the start (the session 7-10 runs were lost with their machine), its
# snapshots judged on the validation prompts as they came (guidance 5, dsm-half's); then the final student:
for s in 1000 2000 3000 4000 5000 6000 7000 8000 9000 10000 11000 12000 13000; do
  $E --student runs/dsm-half-long/snapshots/step-$s --student-steps 25 --guidance-scale 5 --prompts $VAL --out runs/eval/dsm-half-long-$s-val
done
$E --student runs/dsm-half-long/student --student-steps 25 --guidance-scale 4 --guidance-scale 5 --guidance-scale 6 --prompts $VAL --out runs/eval/dsm-half-long-val
$E --student runs/dsm-half-long/student --student-steps 10 --student-steps 25 --guidance-scale 5 --out runs/eval/dsm-half-long-test
python docs/results/students/kd_long.py --teacher-val 0.562
# session 12: kd-half-long trained again from the start (1 thread, PyTorch 2.13.0 CPU, about 1.6 s per step beside an
# ADD training), its snapshots judged on the validation prompts as they came (guidance 4, kd-half's); stopped at
# step 5250 and its checkpoint carried to the next session in study/handoff/kd-half-long/ (a session's runs/ is lost
# with its machine). To resume it there:
#   mkdir -p runs && cp -r study/handoff/kd-half-long runs/kd-half-long
#   tandem distill knowledge --out runs/kd-half-long --arch half --batch-size 64 --lr-stages $STAGES --threads 1 --checkpoint-every 250 --snapshot-every 1000 --resume
for s in 1000 3000 4000 5000; do
  $E --student runs/kd-half-long/snapshots/step-$s --student-steps 25 --guidance-scale 4 --prompts $VAL --out runs/eval/kd-half-long-$s-val
done
python docs/results/students/kd_long.py --teacher-val 0.562
# session 13: kd-half-long resumed from the hand-off (step 5250), its snapshots judged as they came
for s in 6000 7000 8000 9000 10000; do
  $E --student runs/kd-half-long/snapshots/step-$s --student-steps 25 --guidance-scale 4 --prompts $VAL --out runs/eval/kd-half-long-$s-val
done
python docs/results/students/kd_long.py --teacher-val 0.562
# session 13: ADD's lambda (the distillation term's weight) chosen on validation, beside the shipped run's 2.5: 10 and
# 0.5, each as the shipped add's command otherwise (750 steps, lr 5e-5, EMA 0.99), one thread beside the KD run
for L in 10 0.5; do
  tandem distill adversarial --out runs/add-l$L --distill-lambda $L --batch-size 32 --max-steps 750 --lr 5e-5 --threads 1 --checkpoint-every 250 --snapshot-every 250 --ema 0.99
  $E --student runs/add-l$L/student --student-steps 1 --student-steps 2 --student-steps 4 --guidance-scale 1 --prompts $VAL --out runs/eval/add-l$L-750-val
done
# session 13: stopped at step 10,500 and carried to the next session in study/handoff/kd-half-long/ (resume as above)
