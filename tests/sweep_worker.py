"""Run one student configuration of a Sweep (launched by test_eval_processes.py under
``accelerate launch`` with several CPU processes, or alone)."""

import sys

import torch
from worldtools import PROMPTS, world_pipeline

from tandem.eval.sweep import SamplerConfig, Sweep

if __name__ == "__main__":
    torch.set_num_threads(1)
    pipe = world_pipeline(num_inference_steps=2, guidance_scale=6.0, teacher_steps=3, teacher_guidance_scale=4.5)
    sweep = Sweep(pipe, PROMPTS, seed=5, cache_dir=sys.argv[1], batch_size=2)
    sweep.run(SamplerConfig(sys.argv[2], 2))
