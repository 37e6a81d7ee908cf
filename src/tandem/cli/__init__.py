"""The ``tandem`` command line: one module per command group (``generation``: generate, calibrate and
edit; ``world``; ``distill``; ``evaluation``: eval; ``presets``: preset; ``serve``: serve and bench), on the
shared apps, checks and loaders of ``common``."""

from __future__ import annotations

import sys

from . import bench, distill, evaluation, generation, presets, serve, world  # noqa: F401  (each registers its commands)
from .bench import bench_app
from .common import UserError, _checked, app, distill_app, eval_app, preset_app, world_app

for _app in (app, world_app, distill_app, eval_app, preset_app, bench_app):
    for _info in _app.registered_commands:
        _info.callback = _checked(_info.callback)


def main() -> None:
    import warnings

    from typer import Abort

    from ..calibration import CalibrationTieWarning
    from ..world.grammar import CaptionError

    warnings.simplefilter("ignore", CalibrationTieWarning)  # the commands print it as a note
    try:  # newer typer vendors its own click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - typer on upstream click
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        sys.exit(0)
    except UsageError as e:  # bad options: one line, like every other input error
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        sys.exit(1)
    except (UserError, CaptionError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
