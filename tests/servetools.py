"""Helpers for tests of a running server: waiting until it is ready."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest


def wait_until_ready(url: str, seconds: float = 120.0, gone: Callable[[], str | None] | None = None) -> None:
    """Poll ``url``/readyz until it answers 200; fail if ``gone()`` says why the server cannot answer (a process
    that exited), or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        reason = gone() if gone is not None else None
        if reason:
            pytest.fail(reason)
        time.sleep(0.1)
    pytest.fail(f"{url} did not become ready in {seconds:g} s")
