#!/usr/bin/env bash
# DDIL's covariate-shift study (Table 7) for the study's students: a 4-step student whose transitions the
# 32-step teacher (guided DDIM, 8 sub-steps each) takes with probability p_T (0, 0.5), or only at the first
# (999) or the last (249) student timestep.
# The first 500 test prompts, seed 0, exact checker. Usage: bash docs/results/ddil_study/table7.sh RUN...
# (RUN: a directory of runs/study, e.g. cd-base cd-refl-ddil); the judgements go to runs/study/mx/.
set -e
head -500 src/tandem/world/data/prompts_test.txt > runs/study/test500.txt
for RUN in "$@"; do
  for choice in "--teacher-prob 0" "--teacher-prob 0.5" "--teacher-at 999" "--teacher-at 249"; do
    name=$RUN-$(echo "$choice" | tr -d ' -' | sed 's/teacher//')
    if [ ! -f runs/study/mx/$name/judge.json ]; then
      tandem generate --prompts runs/study/test500.txt --model world --student runs/study/$RUN/student --seed 0 \
        --batch-size 100 --mode mixed $choice --out runs/study/mx/$name > /dev/null
      tandem world judge runs/study/mx/$name | tail -1
    fi
  done
done
