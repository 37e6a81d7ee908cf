"""Moves must not change the shipped world's outputs: every command of `tests/bit_identity.py` gives the
digest it gave before the pipeline was split into stages (recorded at commit c9443d9, CPU, one thread)."""

from __future__ import annotations

import json

import pytest
from bit_identity import CASES, DIGESTS, run_case

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bit_identity")


@pytest.mark.parametrize("name", list(CASES))  # in order: generate-cascade uses calibrate-cascade's table
def test_the_shipped_world_gives_the_recorded_outputs(name, work):
    assert run_case(name, work) == json.loads(DIGESTS.read_text())[name]
