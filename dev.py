#!/usr/bin/env python3
"""Developer entry point: sets up ``.venv`` in the checkout, then runs the demo, the tests or lint.

    python3 dev.py demo [ARGS...]   # the main job (``fastinfer demo``)
    python3 dev.py test [PYTEST ARGS...]   # lint + type check + the whole test suite
    python3 dev.py lint             # ruff (lint and format check) and mypy only
    python3 dev.py docs [--serve]   # build the docs site strictly into site/ (or serve it)

It needs nothing but Python >= 3.10 and pip. Every run is idempotent: the virtual environment is
created once, and packages are installed again only when ``pyproject.toml`` changes.

Torch: a torch that is already importable by the interpreter running this script is reused (the
venv then sees system site-packages) and never installed twice. Otherwise ``torch==2.13.0`` is
installed, and on a Linux machine without an NVIDIA GPU the CPU build is requested (the PyTorch CPU
wheel index when it is reachable; a local wheel through pip's own configuration otherwise), because
a plain ``pip install torch`` on Linux pulls several GB of CUDA packages.

System programs: ``test`` also makes sure Debian's Chromium is at ``/usr/bin/chromium`` (the
dashboard's browser test drives it with Playwright), installing it with apt-get when it is missing
and this runs as root on a Debian-like system; otherwise that one test skips and says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EXTRAS = {
    "demo": ["demo"],
    "test": ["dev", "demo", "serve", "transformers", "plot", "docs", "ray", "onnx", "openvino"],
    "docs": ["docs"],
    "lint": ["dev"],
}


def _log(msg: str) -> None:
    print(f"[dev.py] {msg}", flush=True)


def _run(cmd: list[str], **kw: object) -> None:
    _log(" ".join(cmd))
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _python_has_torch(python: str | Path) -> bool:
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 1)"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def ensure_venv(extras: list[str]) -> Path:
    py = _venv_python()
    if not py.exists():
        # Reuse a torch the base interpreter already has instead of installing a second copy.
        system_torch = importlib.util.find_spec("torch") is not None
        args = [sys.executable, "-m", "venv", str(VENV)]
        if system_torch:
            args.append("--system-site-packages")
            _log("reusing the torch already installed for this Python (--system-site-packages)")
        _run(args)
        _run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])

    if not _python_has_torch(py):
        cmd = [str(py), "-m", "pip", "install", TORCH_PIN]
        if sys.platform.startswith("linux") and not _has_gpu():
            if _reachable("download.pytorch.org"):
                cmd += ["--extra-index-url", TORCH_CPU_INDEX]
            else:
                _log(
                    "no GPU: the PyTorch CPU index is unreachable, relying on pip's configured sources"
                )
        _run(cmd)

    # Install the package and the requested extras once per pyproject.toml version.
    wanted = sorted(set(extras))
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / ".fastinfer-installed"
    have = stamp.read_text().split() if stamp.exists() else []
    have_digest, have_extras = (have[0], set(have[1:])) if have else ("", set())
    if have_digest != digest or not set(wanted) <= have_extras:
        union = sorted(set(wanted) | (have_extras if have_digest == digest else set()))
        spec = f"{ROOT}[{','.join(union)}]" if union else str(ROOT)
        # setuptools' build backend warns about every editable install; nothing a user can act on
        quiet = {**os.environ, "PYTHONWARNINGS": "ignore"}
        _run([str(py), "-m", "pip", "install", "-q", "-e", spec], env=quiet)
        stamp.write_text(" ".join([digest, *union]))
    return py


CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> None:
    """Install Debian's chromium (headless browser for the dashboard test) when it is missing."""
    if CHROMIUM.exists():
        return
    if not sys.platform.startswith("linux") or shutil.which("apt-get") is None:
        _log("no /usr/bin/chromium and no apt-get: the dashboard browser test will skip")
        return
    if os.geteuid() != 0:
        _log("no /usr/bin/chromium (apt-get needs root): the dashboard browser test will skip")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(["apt-get", "update", "-q"], env=env)
        _run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium",
             "fonts-dejavu-core"],
            env=env,
        )  # fmt: skip
    except (subprocess.CalledProcessError, OSError) as exc:
        _log(f"could not install chromium ({exc}): the dashboard browser test will skip")


def _quiet_mkdocs() -> dict[str, str]:
    return {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def lint(py: Path) -> None:
    _run([str(py), "-m", "ruff", "check", "."], cwd=ROOT)
    _run([str(py), "-m", "ruff", "format", "--check", "."], cwd=ROOT)
    _run([str(py), "-m", "mypy"], cwd=ROOT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    py = ensure_venv(EXTRAS[cmd])
    try:
        if cmd == "demo":
            _run([str(py), "-m", "fastinfer", "demo", *rest], cwd=ROOT)
        elif cmd == "docs":
            verb = "serve" if "--serve" in rest else "build"
            _run([str(py), "-m", "mkdocs", verb, "--strict"], cwd=ROOT, env=_quiet_mkdocs())
        elif cmd == "lint":
            lint(py)
        else:
            ensure_chromium()
            lint(py)
            _run([str(py), "-m", "pytest", *rest], cwd=ROOT)
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
