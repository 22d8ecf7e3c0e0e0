"""Every environment variable fastinfer reads, in one place (documented in docs/environment-variables.md).

Values are read when a feature is used, never at import time, so a test or a service can set them
after ``import fastinfer``.
"""

from __future__ import annotations

import os
import sys

from fastinfer.errors import ConfigError

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")

# name -> one-line description (docs/environment-variables.md has the long form)
VARIABLES: dict[str, str] = {
    "FASTINFER_PROFILE": "profile every fastinfer.profile() block (and the served model) and write traces",
    "FASTINFER_PROFILE_DIR": "folder for profiler traces (default ./fastinfer-traces)",
    "FASTINFER_CACHE_DIR": "persistent folder for Inductor compile caches, backend and attention decisions, exported artefacts",
    "FASTINFER_PROGRESS": "force progress bars on (1) or off (0); default: only on a terminal",
    # Read (never set) by fastinfer.inductor_cache, because they change what inductor compiles:
    "ATEN_CPU_CAPABILITY": "torch's CPU ISA override (avx2, avx512, default); recorded in compile-cache manifests",
    "CXX": "the C++ compiler inductor uses; fastinfer checks it exists before compiling",
}


def get(name: str, default: str | None = None) -> str | None:
    """Read a documented fastinfer variable (an undocumented name is a programming error)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a documented fastinfer environment variable")
    return os.environ.get(name, default)


def flag(name: str) -> bool | None:
    """A boolean variable: True for 1/true/yes/on, False for 0/false/no/off (case-insensitive,
    surrounding spaces ignored), None when unset or empty.

    Raises ConfigError for any other value: a typo such as ``2`` or ``maybe`` must not silently
    switch a feature off.
    """
    value = get(name)
    if value is None or value.strip() == "":
        return None
    word = value.strip().lower()
    if word in TRUE_VALUES:
        return True
    if word in FALSE_VALUES:
        return False
    raise ConfigError(
        f"environment variable {name}={value!r} is not a boolean. Fix: set it to "
        f"{', '.join(TRUE_VALUES)} (on) or {', '.join(FALSE_VALUES)} (off), in any case, or unset "
        "it (an empty value counts as unset) for the default; see docs/environment-variables.md"
    )


def progress_wanted(explicit: bool | None = None) -> bool:
    """Whether to draw progress bars: ``explicit`` if given, else ``FASTINFER_PROGRESS``, else
    only when stderr is a terminal (a log file gets no bar). ConfigError if the variable holds a
    value that is not a boolean (see :func:`flag`)."""
    if explicit is not None:
        return explicit
    forced = flag("FASTINFER_PROGRESS")
    if forced is not None:
        return forced
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
