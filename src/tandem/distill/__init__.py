"""Distillation of a teacher into few-step students, on one shared accelerate Trainer."""
