"""InductorCache: scoped env/config, the compatibility manifest, bundles, the compile lock.

These tests compile nothing (cheap); the ones that compile into a cache and load it from a fresh
process live in test_compiling.py.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from fastinfer import CacheMismatchError, ConfigError, InductorCache
from fastinfer.compiling import MANIFEST, environment_manifest
from fastinfer.errors import CacheLockTimeout


def test_env_and_config_are_set_inside_and_restored_after(tmp_path: Path) -> None:
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    inductor_config.fx_graph_cache = False
    try:
        with InductorCache(tmp_path / "c") as cache:
            assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.inductor_dir)
            assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
            assert os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
            assert inductor_config.fx_graph_cache is True
            assert functorch_config.enable_autograd_cache is True
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            assert cache_dir() == str(cache.inductor_dir)
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
        assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"
        assert inductor_config.fx_graph_cache is False
        assert not cache.active
    finally:
        inductor_config.fx_graph_cache = True
    assert torch.ones(2).add(1).sum().item() == 4.0  # torch still works


def test_restored_even_when_the_block_raises(tmp_path: Path) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = "/somewhere/else"
    with pytest.raises(RuntimeError, match="boom"), InductorCache(tmp_path):
        raise RuntimeError("boom")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


def test_manifest_records_the_environment(tmp_path: Path) -> None:
    with InductorCache(tmp_path, tag="bert-v1") as cache:
        pass
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert doc == cache.manifest()
    assert doc["torch"] == torch.__version__
    assert doc["threads"] == torch.get_num_threads()
    assert doc["tag"] == "bert-v1"
    for key in ("python", "cpu_capability", "compiler", "gpu", "cuda", "triton", "inductor"):
        assert key in doc
    assert doc["cpu_capability"] == str(torch.backends.cpu.get_cpu_capability()).lower()
    with InductorCache(tmp_path, tag="bert-v1"):  # same environment: accepted
        pass


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param(lambda: os.environ.__setitem__("ATEN_CPU_CAPABILITY", "avx2"), "cpu_capability", id="isa"),
        pytest.param(lambda: torch.set_num_threads(max(1, torch.get_num_threads() - 1) if torch.get_num_threads() > 1 else 2), "threads", id="threads"),
    ],
)  # fmt: skip
def test_a_cache_from_another_environment_is_refused(tmp_path: Path, change, field) -> None:  # type: ignore[no-untyped-def]
    if field == "cpu_capability" and environment_manifest()["cpu_capability"] == "avx2":
        os.environ["ATEN_CPU_CAPABILITY"] = "default"
    else:
        os.environ.pop("ATEN_CPU_CAPABILITY", None)
    with InductorCache(tmp_path):
        pass
    change()
    with pytest.raises(CacheMismatchError, match=field) as info:
        InductorCache(tmp_path).__enter__()
    assert "built for" in str(info.value) and "Fix:" in str(info.value)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or os.environ[
        "TORCHINDUCTOR_CACHE_DIR"
    ] != str(tmp_path / "inductor")


def test_edited_manifest_names_each_differing_field(tmp_path: Path) -> None:
    with InductorCache(tmp_path):
        pass
    doc = json.loads((tmp_path / MANIFEST).read_text())
    doc["torch"] = "1.0.0"
    doc["inductor"]["freezing"] = "other"
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(CacheMismatchError) as info, InductorCache(tmp_path):
        pass
    assert "torch: built for '1.0.0'" in str(info.value)
    assert "inductor.freezing" in str(info.value)


def test_tag_mismatch_and_replace(tmp_path: Path) -> None:
    with InductorCache(tmp_path, tag="a") as cache:
        (cache.inductor_dir / "stale").write_text("x")
    with pytest.raises(CacheMismatchError, match="tag"), InductorCache(tmp_path, tag="b"):
        pass
    with InductorCache(tmp_path, tag="b", on_mismatch="replace") as cache:
        assert not (cache.inductor_dir / "stale").exists()
    assert json.loads((tmp_path / MANIFEST).read_text())["tag"] == "b"


def test_default_path_comes_from_fastinfer_cache_dir(tmp_path: Path) -> None:
    os.environ.pop("FASTINFER_CACHE_DIR", None)
    with pytest.raises(ConfigError, match="FASTINFER_CACHE_DIR"):
        InductorCache()
    os.environ["FASTINFER_CACHE_DIR"] = str(tmp_path / "persist")
    assert InductorCache().path == (tmp_path / "persist").resolve()
    with pytest.raises(ConfigError, match="on_mismatch"):
        InductorCache(tmp_path, on_mismatch="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="empty path"):
        InductorCache("")  # not the working directory


def test_not_reentrant(tmp_path: Path) -> None:
    cache = InductorCache(tmp_path)
    with cache, pytest.raises(ConfigError, match="re-entrant"):
        cache.__enter__()


def _fake_cache(path: Path, tag: str | None = None) -> InductorCache:
    with InductorCache(path, tag=tag) as cache:
        (cache.inductor_dir / "fxgraph" / "ab").mkdir(parents=True)
        (cache.inductor_dir / "fxgraph" / "ab" / "entry").write_bytes(b"compiled")
        (cache.inductor_dir / "locks").mkdir()
        (cache.inductor_dir / "locks" / "x.lock").write_text("")
    return cache


def test_export_and_import_round_trip(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path / "src", tag="t")
    bundle = cache.export(tmp_path / "out" / "bundle.tar")
    assert bundle.is_file() and not list(bundle.parent.glob(".*tmp"))
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert MANIFEST in names and not any(n.endswith(".lock") for n in names)
    dest = InductorCache.import_(bundle, tmp_path / "dest")
    assert dest.tag == "t"
    assert (dest.inductor_dir / "fxgraph" / "ab" / "entry").read_bytes() == b"compiled"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest.import.") and p.is_dir()]
    # A second import into the same (matching) folder reuses it.
    again = InductorCache.import_(bundle, tmp_path / "dest")
    assert again.path == dest.path
    with dest:  # usable as a cache here
        pass


def test_import_refuses_a_bundle_from_another_environment(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path / "src")
    doc = json.loads((cache.path / MANIFEST).read_text())
    doc["cpu_capability"] = "zvector"
    (cache.path / MANIFEST).write_text(json.dumps(doc))
    bundle = cache.export(tmp_path / "b.tar")
    with pytest.raises(CacheMismatchError, match="cpu_capability: built for 'zvector'"):
        InductorCache.import_(bundle, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_import_rejects_bad_bundles(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        InductorCache.import_(tmp_path / "missing.tar", tmp_path / "d")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(ConfigError, match="not a fastinfer cache bundle"):
        InductorCache.import_(junk, tmp_path / "d")
    with pytest.raises(ConfigError, match="no fastinfer cache"):
        InductorCache(tmp_path / "empty").export(tmp_path / "x.tar")


def test_import_into_a_folder_holding_another_cache_is_refused(tmp_path: Path) -> None:
    bundle = _fake_cache(tmp_path / "src", tag="a").export(tmp_path / "b.tar")
    _fake_cache(tmp_path / "other", tag="b")
    with pytest.raises(CacheMismatchError, match="another cache"):
        InductorCache.import_(bundle, tmp_path / "other", tag="a")


def test_one_holder_of_the_compile_lock_others_wait(tmp_path: Path) -> None:
    cache = InductorCache(tmp_path)
    with cache:
        pass
    held, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with cache.exclusive():
            held.set()
            release.wait(30)
        done.set()

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    with (
        pytest.raises(CacheLockTimeout, match="another process"),
        InductorCache(tmp_path).exclusive(timeout=0.05),
    ):
        pass
    release.set()
    assert done.wait(30)
    t.join()
    other = InductorCache(tmp_path)
    with other.exclusive(timeout=5):
        pass
    assert other.statistics().lock_waits == 0


def test_statistics_start_at_zero(tmp_path: Path) -> None:
    cache = InductorCache(tmp_path)
    with cache:
        s = cache.statistics()
        assert s.active and (s.cache_hits, s.cache_misses, s.cache_bypasses) == (0, 0, 0)
    assert not cache.statistics().active


def test_the_compile_lock_excludes_other_processes(tmp_path: Path) -> None:
    with InductorCache(tmp_path):
        pass
    held, release = tmp_path / "held", tmp_path / "release"
    code = f"""
import pathlib, time, fastinfer
cache = fastinfer.InductorCache({str(tmp_path)!r})
with cache.exclusive():
    pathlib.Path({str(held)!r}).touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path({str(release)!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
print("released")
"""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not held.exists():  # the other process holds the lock
            assert proc.poll() is None and time.monotonic() < deadline, "holder did not start"
            time.sleep(0.01)
        with (
            pytest.raises(CacheLockTimeout, match="another process"),
            InductorCache(tmp_path).exclusive(timeout=0.2),
        ):
            pass
        release.touch()
        waiter = InductorCache(tmp_path)
        with waiter.exclusive(timeout=60):  # waits for the holder, then gets it
            pass
        assert proc.wait(60) == 0 and "released" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_compile_lock_is_reentrant_within_a_thread(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path / "c")
    with cache.exclusive(timeout=1), InductorCache(cache.path).exclusive(timeout=1):
        bundle = cache.export(tmp_path / "b.tar")  # takes the lock again: no deadlock
    assert bundle.is_file()
    released = threading.Event()

    def other_thread() -> None:
        with InductorCache(cache.path).exclusive(timeout=5):
            released.set()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(30)
    assert released.is_set(), "the lock was not released after the outermost exit"
