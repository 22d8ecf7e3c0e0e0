"""One virtual environment per peer, created on first use under ``benchmarks/.peers/<name>/``.

Each peer gets its own venv so that its dependencies (TorchServe's Java front end and Python
backend, LitServe, Ray Serve) never touch fastinfer's environment, and every venv has the same
torch as fastinfer's (``torch==2.13.0``, which pip takes from the machine's local wheel). The
repository is put on ``PYTHONPATH`` when a peer server starts, so every stack builds the same
model class and the same tokenizer from ``fastinfer.testing`` (which needs numpy and psutil).

An environment is reused while its requirement list is unchanged (a stamp file holds it). A failed
install is kept as a reason (the last lines of pip's output, the full log beside it) that the
benchmark prints in its table instead of dropping the peer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent.parent / ".peers"
TORCH = "torch==2.13.0"  # the same torch as fastinfer's venv (a local CPU wheel here)
BASE = (TORCH, "numpy", "psutil")

# Pinned so that a figure names the version it measured.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    # TorchServe 0.12.0 is the last release (the project is in limited maintenance since 2025).
    "torchserve": (*BASE, "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml"),
    "litserve": (*BASE, "litserve==0.2.19"),
    "ray": (*BASE, "ray[serve]==2.60.0"),
}

# Programs a peer needs beyond its venv, and how to get them here (Debian's packages).
PROGRAMS: dict[str, tuple[str, str]] = {
    "torchserve": (
        "java",
        "TorchServe's front end needs Java 11+: apt-get install -y openjdk-17-jre-headless",
    ),
}


@dataclass(frozen=True)
class PeerEnv:
    """A peer's venv: its python, or the reason it could not be made."""

    name: str
    root: Path
    python: Path | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.python is not None

    def bin(self, tool: str) -> Path:
        return self.root / "bin" / tool


def _tail(text: str, lines: int = 6) -> str:
    """pip's ERROR lines when it printed some, else its last lines."""
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in kept if ln.startswith("ERROR")]
    return " | ".join((errors or kept)[-lines:])


def ensure(name: str, *, log: bool = True) -> PeerEnv:
    """Create (or reuse) the venv for peer ``name`` and install its requirements into it."""
    reqs = REQUIREMENTS[name]
    root = PEERS_DIR / name
    if name in PROGRAMS and shutil.which(PROGRAMS[name][0]) is None:
        return PeerEnv(name, root, None, f"no `{PROGRAMS[name][0]}` on PATH: {PROGRAMS[name][1]}")
    python = root / "bin" / "python"
    stamp = root / ".installed"
    wanted = "\n".join(reqs) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return PeerEnv(name, root, python)
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    if log:
        print(f"  installing {name} into {root} ({' '.join(reqs)}) ...", flush=True)
    try:
        venv.create(root, with_pip=True)
    except Exception as exc:  # venv/ensurepip missing on this Python
        return PeerEnv(name, root, None, f"venv creation failed: {exc}")
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-input", *reqs],
        capture_output=True,
        text=True,
    )
    (root / "install.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return PeerEnv(
            name, root, None, f"pip install failed ({proc.returncode}): {_tail(proc.stderr)}"
        )
    stamp.write_text(wanted)
    return PeerEnv(name, root, python)


def main_python() -> Path:
    """fastinfer's own interpreter (the benchmark's): plain FastAPI and fastinfer run in it."""
    return Path(sys.executable)


if __name__ == "__main__":  # pre-install every peer: python benchmarks/peers/envs.py [names]
    for peer in sys.argv[1:] or list(REQUIREMENTS):
        env = ensure(peer)
        print(f"{peer}: {'ok' if env.ok else env.reason}")
