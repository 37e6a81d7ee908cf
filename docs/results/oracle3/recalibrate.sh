#!/usr/bin/env bash
# every calibration the world ships, re-made with the world's oracle as shipped now (the calibrate commands of
# the README's "Training the world"); W: the world directory being shipped
set -euo pipefail
W=${W:-src/tandem/assets/world}
export OMP_NUM_THREADS=1
tandem calibrate --model world --out $W/calibration.json --overwrite
tandem calibrate --model world --student cd --out $W/calibration-cd.json --overwrite
tandem calibrate --model world --student dmd2 --out $W/calibration-dmd2.json --overwrite
tandem calibrate --model world --student add --out $W/calibration-add.json --overwrite
tandem calibrate --model world --edits val --strength 0.6 --out $W/calibration-edit-0.6.json --overwrite
tandem calibrate --model world --control mask --out $W/controlnet-mask/calibration.json --overwrite
tandem calibrate --model world --control edges --out $W/controlnet-edges/calibration.json --overwrite
