"""The compile cache under faults: a damaged manifest, corrupt cached modules, a read-only folder.

The manifest tests compile nothing. The cached-module tests compile TinyMLP once into a module-scoped
folder (in a fresh process) and then start fresh processes on damaged copies of it, as a restart
would: a shared library already loaded in this process would never be read again from disk.

A read-only folder is made for real: a read-only bind mount in a private mount namespace
(``unshare -rm``, which works as root and, where user namespaces are allowed, without it), or
``chmod`` when the tests do not run as root; the test is skipped where neither is possible.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_python

from fastinfer import CacheMismatchError, ConfigError, InductorCache
from fastinfer.compiling import MANIFEST, environment_manifest

pytestmark = pytest.mark.timeout(280)

# --------------------------------------------------------------------------------------------
# A damaged manifest
# --------------------------------------------------------------------------------------------

DAMAGED = {
    "empty": "",
    "truncated": '{"format": 1, "torch": "2.',
    "null": "null",
    "list": "[]",
    "pairs": '[["format", 1]]',
    "string": '"fastinfer"',
    "no-format": '{"torch": "2.13.0"}',
    "missing-fields": '{"format": 1, "torch": "2.13.0"}',
}


def _damage(folder: Path, text: str) -> None:
    with InductorCache(folder) as cache:
        (cache.inductor_dir / "stale-entry").write_text("compiled for the old manifest")
    (folder / MANIFEST).write_text(text)


def test_the_manifest_fields_are_the_environments() -> None:
    from fastinfer.compiling._manifest import FIELDS

    assert tuple(environment_manifest()) == FIELDS


@pytest.mark.parametrize("text", list(DAMAGED.values()), ids=list(DAMAGED))
def test_a_damaged_manifest_is_reported_as_corrupt_with_the_fix(tmp_path: Path, text: str) -> None:
    _damage(tmp_path, text)
    with pytest.raises(CacheMismatchError) as info, InductorCache(tmp_path):
        pass
    message = str(info.value)
    assert str(tmp_path / MANIFEST) in message and "the cache is corrupt" in message
    assert "on_mismatch='replace'" in message and f"delete {tmp_path}" in message
    with pytest.raises(CacheMismatchError, match="the cache is corrupt"):
        InductorCache(tmp_path).manifest()


@pytest.mark.parametrize("text", list(DAMAGED.values()), ids=list(DAMAGED))
def test_replace_recovers_from_a_damaged_manifest(tmp_path: Path, text: str) -> None:
    _damage(tmp_path, text)
    with InductorCache(tmp_path, on_mismatch="replace") as cache:
        assert not (cache.inductor_dir / "stale-entry").exists()  # built for who knows what
        assert cache.inductor_dir.is_dir()
    assert json.loads((tmp_path / MANIFEST).read_text()) == environment_manifest()
    with InductorCache(tmp_path):  # and it is a good cache again
        pass


@pytest.mark.parametrize("text", ["null", "", "[1, 2]"], ids=["null", "empty", "list"])
def test_a_bundle_with_a_damaged_manifest_is_refused(tmp_path: Path, text: str) -> None:
    bundle = tmp_path / "b.tar"
    with tarfile.open(bundle, "w") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(text.encode())
        tar.addfile(info, io.BytesIO(text.encode()))
    with pytest.raises(
        ConfigError, match=f"the {MANIFEST} in cache bundle .* the bundle is damaged"
    ):
        InductorCache.import_(bundle, tmp_path / "dest")


def test_clear_removes_the_compiled_artifacts_and_keeps_the_manifest(tmp_path: Path) -> None:
    with InductorCache(tmp_path) as cache:
        (cache.inductor_dir / "ab").mkdir()
        (cache.inductor_dir / "ab" / "module.py").write_text("x = 1")
        (tmp_path / "triton").mkdir()
        cache.clear()
        assert cache.inductor_dir.is_dir() and not any(cache.inductor_dir.iterdir())
        assert not (tmp_path / "triton").exists()
    assert InductorCache(tmp_path).manifest() == environment_manifest()


# --------------------------------------------------------------------------------------------
# A read-only folder (a prebuilt cache baked into an image)
# --------------------------------------------------------------------------------------------


def _run_read_only(
    folder: Path, code: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that sees ``folder`` read-only (for real)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-c", code]
    if shutil.which("unshare") and shutil.which("mount"):
        f = str(folder)
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script, "sh", f, *cmd],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )  # fmt: skip
        if "mount" not in proc.stderr and "unshare" not in proc.stderr:
            return proc
    if os.geteuid() == 0:
        pytest.skip(
            "cannot make a read-only folder here (no user namespaces, and root ignores chmod)"
        )
    subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
    try:
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return dict(json.loads(line.removeprefix("RESULT ")))


_READ_ONLY_CHILD = r"""
import json, os, sys
from pathlib import Path
from fastinfer import CacheMismatchError, ConfigError, InductorCache

root = Path(ROOT_DIR)
out = {}
with InductorCache(root / "prebuilt") as cache:  # no lock, no manifest write
    overlay = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    out["overlay_outside"] = not overlay.startswith(str(root))
    out["linked"] = os.path.islink(os.path.join(overlay, "ab", "module.py"))
    out["locks_writable"] = os.access(os.path.join(overlay, "locks"), os.W_OK)
    with cache.exclusive():
        pass
    out["read_only"] = cache.statistics().read_only
out["overlay_removed"] = not os.path.exists(overlay)
try:
    InductorCache(root / "empty").__enter__()
except ConfigError as exc:
    out["empty"] = str(exc)
try:
    InductorCache(root / "other", on_mismatch="replace").__enter__()
except CacheMismatchError as exc:
    out["other"] = str(exc)
print("RESULT " + json.dumps(out))
"""


def test_a_read_only_prebuilt_cache_is_used_without_locks(tmp_path: Path) -> None:
    root = tmp_path / "image"
    with InductorCache(root / "prebuilt") as cache:
        (cache.inductor_dir / "ab").mkdir()
        (cache.inductor_dir / "ab" / "module.py").write_text("x = 1")
    (root / "empty").mkdir()
    with InductorCache(root / "other", tag="another-model"):
        pass
    out = _result(_run_read_only(root, _READ_ONLY_CHILD.replace("ROOT_DIR", repr(str(root)))))
    assert out["overlay_outside"] and out["linked"] and out["locks_writable"]
    assert out["read_only"] and out["overlay_removed"]
    assert "read-only here and holds no fastinfer cache" in out["empty"]
    assert "tag: built for 'another-model'" in out["other"]
    assert "read-only here, so on_mismatch='replace' cannot rebuild it" in out["other"]


# --------------------------------------------------------------------------------------------
# Cached modules (one real compile, shared by the module; each use in a fresh process)
# --------------------------------------------------------------------------------------------

_COMPILE = r"""
import json, logging, sys
import torch, fastinfer
from fastinfer import testing
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
PATCH
sizes = SIZES
with fastinfer.InductorCache(CACHE_DIR) as cache:
    model = testing.tiny_mlp()
    compiled = fastinfer.compile_model(model, torch.randn(2, 32), batch_sizes=sizes, cache=cache)
    x = torch.randn(3, 32)
    torch.testing.assert_close(compiled(x[:1]), model(x[:1]))
    s, c = compiled.statistics(), cache.statistics()
print("RESULT " + json.dumps({"hits": s.cache_hits, "misses": s.cache_misses,
                              "repairs": getattr(c, "repairs", None),
                              "read_only": getattr(c, "read_only", None)}))
"""


def _compile_code(cache: Path, sizes: tuple[int, ...] = (1,), patch: str = "") -> str:
    return (
        _COMPILE.replace("CACHE_DIR", repr(str(cache)))
        .replace("SIZES", repr(sizes))
        .replace("PATCH", patch)
    )


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("warm-cache")
    out = _result(run_python(_compile_code(path), timeout=240, check=False))
    assert out["misses"] >= 1
    return path


def _copy(warm: Path, dest: Path) -> Path:
    shutil.copytree(warm, dest, symlinks=True)  # copy2 keeps the modification times
    return dest


GARBAGE = {".py": b"garbage (\n", ".so": b"\x7fELF cut short"}.values()


def _corrupt(cache: Path) -> list[Path]:
    damaged = [
        p
        for p in (cache / "inductor").rglob("*")
        if p.is_file() and p.suffix in (".py", ".so") and "locks" not in p.parts
    ]
    for p in damaged:
        p.write_bytes(b"garbage (\n" if p.suffix == ".py" else b"\x7fELF cut short")  # GARBAGE
        os.utime(p, (1_000_000_000, 1_000_000_000))  # written long before this start
    return damaged


_CORRUPT_CHILD = r"""
import json, logging, os, sys
import torch, fastinfer
from fastinfer import testing
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
cache_dir = CACHE_DIR


def compile_once():
    with fastinfer.InductorCache(cache_dir) as cache:
        model = testing.tiny_mlp()
        compiled = fastinfer.compile_model(model, torch.randn(2, 32), cache=cache)
        x = torch.randn(1, 32)
        torch.testing.assert_close(compiled(x), model(x))
        return compiled.statistics(), cache.statistics()


out = {}
unlink = os.unlink
def refuse(path, *args, **kwargs):  # first, the cache's files cannot be removed (another owner)
    if str(path).startswith(cache_dir):
        raise PermissionError(13, "Permission denied", path)
    return unlink(path, *args, **kwargs)
os.unlink = refuse
try:
    compile_once()
except fastinfer.CompileError as exc:
    out["refused"] = str(exc)
os.unlink = unlink  # then they can: a restart repairs the cache
s, c = compile_once()
out.update(hits=s.cache_hits, repairs=getattr(c, "repairs", None))
print("RESULT " + json.dumps(out))
"""


def test_a_corrupt_cached_module_is_removed_and_compiled_again(warm: Path, tmp_path: Path) -> None:
    cache = _copy(warm, tmp_path / "c")
    damaged = _corrupt(cache)
    assert damaged
    proc = run_python(
        _CORRUPT_CHILD.replace("CACHE_DIR", repr(str(cache))), timeout=240, check=False
    )
    out = _result(proc)
    # where the corrupt file cannot be removed: CompileError naming it, the cache and the fix
    message = out["refused"]
    assert f"a file of the compile cache {cache}" in message
    assert "the cached module is corrupt" in message and "could not be removed" in message
    assert f"InductorCache({str(cache)!r}).clear()" in message and f"delete {cache}" in message
    # where it can: removed, compiled again, and the cache still hits
    assert out["repairs"] >= 1 and out["hits"] >= 1
    assert f"compile cache {cache}: removed the cached file" in proc.stdout
    removed = re.findall(r"removed the cached file (\S+), which failed to load", proc.stdout)
    assert len(removed) == out["repairs"]
    for name in removed:  # each was written again, valid
        assert Path(name) in damaged and Path(name).read_bytes() not in GARBAGE, name


@pytest.mark.slow
def test_a_read_only_warm_cache_serves_hits_and_compiles_misses_aside(
    warm: Path, tmp_path: Path
) -> None:
    cache = _copy(warm, tmp_path / "image" / "cache")
    out = _result(_run_read_only(tmp_path / "image", _compile_code(cache, sizes=(1, 4))))
    assert out["read_only"] and out["hits"] >= 1  # batch size 1 came from the prebuilt cache
    assert out["misses"] >= 1  # batch size 4 was compiled into the scratch overlay
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in warm.iterdir())


def test_failures_that_name_no_stored_cache_file_are_raised_unchanged(tmp_path: Path) -> None:
    """A file this compile just wrote (a genuine C++ error) or no file at all: no repair, no retry."""
    from fastinfer.compiling._cache_files import call_repairing

    calls: list[str] = []
    with InductorCache(tmp_path) as cache:
        fresh = cache.inductor_dir / "xy" / "cnew.cpp"

        def genuine() -> None:
            calls.append("genuine")
            fresh.parent.mkdir(exist_ok=True)
            fresh.write_text("int main() { return }")
            raise RuntimeError(f"CppCompileError: C++ compile error in {fresh}")

        def elsewhere() -> None:
            calls.append("elsewhere")
            raise RuntimeError("unrelated failure in /somewhere/else.py")

        with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):
            call_repairing(cache, genuine)
        with pytest.raises(RuntimeError, match="unrelated"):
            call_repairing(cache, elsewhere)
        assert fresh.exists() and cache.statistics().repairs == 0
    assert calls == ["genuine", "elsewhere"]
