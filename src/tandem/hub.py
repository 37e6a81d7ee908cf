"""Where model files come from: local diffusers directories (checked for their layout before diffusers reads
them) and the Hugging Face hub (asked once whether it answers; failures in one line that names the model)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .checks import load_pretrained, quote

# A diffusers Stable Diffusion directory: each component's folder and the file that configures it.
SD_LAYOUT = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "tokenizer": None, "scheduler": "scheduler_config.json"}


def check_model_dir(path: str | Path, components: tuple[str, ...] | None = None,
                    layout: dict[str, str | None] = SD_LAYOUT,
                    expected: str = "a diffusers Stable Diffusion directory") -> None:
    """Raise a ``ValueError`` naming the first folder or config file of ``layout`` (only ``components`` of
    it, if given) that ``path`` lacks; diffusers would report only "no file named config.json"."""
    path = Path(path)
    folders = ", ".join(f"{name}/" for name in layout)
    for name, config in layout.items():
        if components is not None and name not in components:
            continue
        if not (path / name).is_dir():
            raise ValueError(f"{path} has no {name}/ (expected {expected} with {folders})")
        if config is not None and not (path / name / config).is_file():
            raise ValueError(f"{path / name} has no {config} (expected {expected} with {folders})")


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long to be a path, say
        return False


def written_as_path(name: str) -> str | None:
    """Why ``name`` (not an existing directory) is a path rather than a hub id ``org/name``, or None."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return "it is written as a path"
    if "\\" in name or name.count("/") > 1:
        return "a hub id has one '/'"
    org = name.split("/")[0] if name.count("/") == 1 else None
    if org and is_dir(Path(org)):
        return f"{org}/ exists here"
    return None


HUB_PROBE_SECONDS = 60.0  # how long one answer to "is the hub reachable?" is reused
_hub_probes: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when asked, why unreachable or None)
# Exceptions (by class name, anywhere in their hierarchy) that mean the hub did not answer, for the
# HTTP clients of old and new huggingface_hub (requests, httpx) and the OS underneath.
_NETWORK_ERRORS = frozenset({
    "ConnectionError", "ConnectTimeout", "ConnectError", "ProxyError", "ReadTimeout", "Timeout", "TimeoutError",
    "TimeoutException", "TransportError", "NetworkError", "gaierror", "OfflineModeIsEnabled",
    "LocalEntryNotFoundError"})
_NETWORK_WORDS = ("couldn't connect", "offline", "max retries", "name or service not known",
                  "connection refused", "network is unreachable")


def hub_unreachable(timeout: float | None = None) -> str | None:
    """None when the Hugging Face hub answers one request (no retries) within ``timeout`` seconds
    [``HF_HUB_ETAG_TIMEOUT``, 10]; else why not, in one line: offline mode (``HF_HUB_OFFLINE=1``) or the
    connection's error. An answer is reused for ``HUB_PROBE_SECONDS``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is enabled (HF_HUB_OFFLINE=1)"
    endpoint = constants.ENDPOINT
    asked = _hub_probes.get(endpoint)
    if asked is not None and time.monotonic() - asked[0] < HUB_PROBE_SECONDS:
        return asked[1]
    from huggingface_hub.utils import get_session

    why = None
    try:
        get_session().head(endpoint, timeout=timeout if timeout is not None else constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # noqa: BLE001 -- whatever stops one request stops the loading after it
        why = f"{endpoint}: {_first_line(e)}"
    _hub_probes[endpoint] = (time.monotonic(), why)
    return why


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _network_cause(exc: BaseException) -> BaseException | None:
    """The innermost exception in ``exc``'s chain (``__cause__``/``__context__``) that says the hub did not
    answer (a connection or timeout error, offline mode, a file neither on the hub nor cached), or None."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc).lower()
        if names & _NETWORK_ERRORS or any(word in text for word in _NETWORK_WORDS):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


def hub_error(source: str, what: str, exc: BaseException, unreachable: str | None = None) -> ValueError:
    """A one-line ``ValueError`` for a failure to load ``what`` ("model", "student", "scorer") from ``source``:
    for a hub id that failed because the hub did not answer (``unreachable``, from :func:`hub_unreachable`,
    or a network error in ``exc``'s chain), "{what} {source!r} is not a local directory, and the hub is
    unreachable: <why>"; otherwise "cannot load {what} {source!r}: <first line of exc>"."""
    if not is_dir(Path(source)):
        cause = _network_cause(exc)
        why = unreachable or (_first_line(cause) if cause is not None else None)
        if why:
            return ValueError(f"{what} {quote(source)} is not a local directory, and the hub is unreachable: {why}")
    return ValueError(f"cannot load {what} {quote(source)}: {_first_line(exc)}")


def from_hub(load: Callable, source: str, what: str, **kwargs):
    """``load(source, **kwargs)`` (a diffusers or transformers ``from_pretrained``) for a local directory or
    a hub id, failing with one line: for a directory, :func:`tandem.checks.load_pretrained`'s (damaged or
    pickled weights, a directory of another model class, missing weights, named); for a hub id,
    :func:`hub_error`'s. The hub is asked first (:func:`hub_unreachable`): if it does not answer, only the
    local cache is read (``local_files_only``), so an unreachable hub costs one request, not
    huggingface_hub's ~25 s of retries per file."""
    if is_dir(Path(source)):
        return load_pretrained(load, source, what, **kwargs)
    why_a_path = written_as_path(source)
    if why_a_path:
        raise ValueError(f"{what} {quote(source)}: no such directory ({why_a_path}, so it is not read as a hub "
                         "id 'org/name')")
    unreachable = hub_unreachable()
    if unreachable:
        kwargs["local_files_only"] = True
    try:
        return load(source, **kwargs)
    except Exception as e:
        if isinstance(e, OSError) or unreachable or _network_cause(e) is not None \
                or type(e).__module__.startswith("huggingface_hub"):
            raise hub_error(source, what, e, unreachable) from e
        raise


def quiet_hub_libraries() -> None:
    """Silence diffusers/transformers loading bars and info logs (tandem shows its own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
