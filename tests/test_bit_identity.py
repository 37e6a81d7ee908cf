"""Moves must not change the shipped world's outputs: every command of `tests/bit_identity.py` gives the
digest it gave before the pipeline was split into stages (recorded at commit c9443d9, CPU, one thread; one set
per CPU kernel set, see `tests/bit_identity.py`)."""

from __future__ import annotations

import pytest
from bit_identity import CASES, cpu_capability, recorded_digests, run_case

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bit_identity")


# in order: generate-cascade uses calibrate-cascade's table. eval-budget (52 s on an AVX2-only machine, a third of
# the file's time) runs with -m slow; the default run keeps every command the pipeline itself runs.
SLOW = {"eval-budget"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in CASES])
def test_the_shipped_world_gives_the_recorded_outputs(name, work):
    digests = recorded_digests()
    if digests is None:
        pytest.skip(f"no digests recorded for this CPU's kernel set ({cpu_capability()}): "
                    "python tests/bit_identity.py --record")
    assert run_case(name, work) == digests[name]
