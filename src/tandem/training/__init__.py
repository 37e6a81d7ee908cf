"""Training machinery that every training shares: the one Trainer (:mod:`~tandem.training.trainer`), what a
training is told (:mod:`~tandem.training.config`: ``TrainerConfig``, ``Trainable``), what a method and the
Trainer say to each other (:mod:`~tandem.training.method`: ``Method``, ``StepContext``, ``EMACopy``), LR schedules
(:mod:`~tandem.training.schedules`), run directories and checkpoints (:mod:`~tandem.training.checkpoints`) and the
checks of a training config's numbers (:mod:`~tandem.training.checks`). The distillation methods
(:mod:`tandem.distill`) and the world's component trainings (:mod:`tandem.world`) build on it; it imports neither."""
