"""tandem: a few-step student and its slow teacher, working in tandem.

The public API::

    from tandem import TandemPipeline

    pipe = TandemPipeline.from_pretrained("world")   # a preset, or a directory written by save_pretrained
    out = pipe(["a red circle"], mode="adaptive")    # out.images, out.records, out.summary
"""

__version__ = "0.1.0"  # before the imports below: modules that record the version import it from here

from .calibration import Calibration
from .cascade import Cascade, CascadeTable
from .loaders import load_controlnet, load_student, load_teacher
from .pipeline import TandemOutput, TandemPipeline, load_preset
from .presets import PRESETS, Preset, compose
from .routes import RouteTable
from .scorers import load_scorer

__all__ = [
    "PRESETS",
    "Calibration",
    "Cascade",
    "CascadeTable",
    "Preset",
    "RouteTable",
    "TandemOutput",
    "TandemPipeline",
    "__version__",
    "compose",
    "load_controlnet",
    "load_preset",
    "load_scorer",
    "load_student",
    "load_teacher",
]
