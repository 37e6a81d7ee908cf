"""What every benchmark does with its result: print it as JSON, and write it to ``--json`` if given."""

from __future__ import annotations

import json


def emit(result: dict, path: str | None) -> dict:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return result
