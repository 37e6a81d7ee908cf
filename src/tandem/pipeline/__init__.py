"""The adaptive teacher-student pipeline as a package: the class (:mod:`.tandem`; editing in :mod:`.editing`), the stages of Algorithm 1
over a batch (:mod:`.stages`), a call's settings resolved once (:mod:`.settings`), routing (:mod:`.routing`),
schedules (:mod:`.schedules`), records and costs (:mod:`.records`), the components a student and teacher share
(:mod:`.components`), calibration (:mod:`.calibrating`), mixed rollouts (:mod:`.mixed`) and one model alone through
the same stages (:mod:`.alone`)."""

from .alone import generate_alone
from .components import images_to_unit_tensor
from .loading import PRESET_FILE
from .records import (
    PATHS,
    RECORD_EXTRA_FIELDS,
    RECORD_FIELDS,
    RUN_RECORD_FIELDS,
    CostLedger,
    TandemOutput,
    image_record,
    run_record,
    summarize_records,
)
from .routing import ROUTINGS, Cutoff, budget_exact_count, lowest_scores
from .schedules import RefineSchedule, edit_timesteps, refine_schedule, teacher_edit_timesteps
from .settings import MODES, STRATEGIES
from .stages import Phases, decode, run_stages, score_images, student_draw, teacher_refine, teacher_regenerate
from .tandem import TandemPipeline, load_preset

__all__ = [
    "MODES", "PATHS", "PRESET_FILE", "RECORD_EXTRA_FIELDS", "RECORD_FIELDS", "ROUTINGS", "RUN_RECORD_FIELDS", "STRATEGIES",
    "CostLedger", "Cutoff", "Phases", "RefineSchedule", "TandemOutput", "TandemPipeline", "budget_exact_count",
    "decode", "edit_timesteps", "generate_alone", "image_record", "images_to_unit_tensor", "load_preset", "lowest_scores",
    "refine_schedule", "run_record", "run_stages", "score_images", "student_draw", "summarize_records", "teacher_edit_timesteps",
    "teacher_refine", "teacher_regenerate",
]
