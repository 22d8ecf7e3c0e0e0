"""The compile cache, AOT packages and bundles under faults (outside probe C).

A cache path with a space, a full disk, a generated module cut short but still valid Python, a
damaged ISA-probe record, an AOT package without a usable manifest, destinations that cannot be
written, malicious bundle members. Compile errors are built from inductor's own exception types;
one test compiles for real (a restart on a cache whose modules were cut short).
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import sys
import tarfile
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_python

import fastinfer
from fastinfer import CacheMismatchError, ConfigError, InductorCache, testing
from fastinfer.compiling import MANIFEST
from fastinfer.compiling._cache_files import call_repairing
from fastinfer.compiling._verify import explain

pytestmark = pytest.mark.timeout(280)

_OLD = (1_000_000_000, 1_000_000_000)  # a file stored long before this compile


def _cpp_error(cmd: list[str], output: str) -> BaseException:
    """A C++ compile failure the way compile_model sees it: inductor's CppCompileError inside a
    dynamo wrapper."""
    from torch._inductor.exc import CppCompileError

    try:
        try:
            raise CppCompileError(cmd, output)
        except CppCompileError as inner:
            raise RuntimeError(f"backend='inductor' raised:\nCppCompileError: {inner}") from inner
    except RuntimeError as outer:
        return outer


def _stored(path: Path, text: str = "int f() { return 0; }\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, _OLD)
    return path


# --------------------------------------------------------------------------------------------
# A cache path with a space; what a C++ compile error is reported as
# --------------------------------------------------------------------------------------------


def test_a_cache_path_with_whitespace_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spaced = tmp_path / "my cache"
    with pytest.raises(ConfigError) as info:
        InductorCache(spaced)
    assert repr(str(spaced)) in str(info.value) and "a path without spaces" in str(info.value)
    assert not spaced.exists()
    monkeypatch.setenv("FASTINFER_CACHE_DIR", str(spaced))  # compile_model's cache dir too
    with pytest.raises(ConfigError, match="contains whitespace"):
        fastinfer.compile_model(testing.tiny_mlp(), torch.randn(2, 32), backend="inductor")


def test_a_compiler_error_shows_the_compilers_words_not_a_missing_compiler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = "/srv/my cache/inductor"
    warnings = "".join(
        f"x.h:{i}:7: warning: overflow in conversion [-Woverflow]\n" for i in range(500)
    )
    exc = _cpp_error(
        ["g++", f"{folder}/sr/c1.main.cpp", "-O3", "-o", f"{folder}/sr/c1.main.so"],
        f"{warnings}g++: fatal error: input file '/srv/my' is the same as output file\n"
        "compilation terminated.\n",
    )
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", folder)
    message = explain(exc)
    assert "no working C++ compiler" not in message
    assert "g++: fatal error: input file '/srv/my' is the same as output file" in message
    assert "warning" not in message and len(message) < 1200  # the first errors only
    assert "without spaces" in message and repr(folder) in message
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/cache")
    assert "without spaces" not in explain(exc)
    # "no working C++ compiler" where none is found
    monkeypatch.setattr("fastinfer.compiling._verify.compiler_path", lambda: None)
    assert explain(exc).startswith("no working C++ compiler found")


def test_an_invalid_compiler_is_still_no_working_compiler() -> None:
    from torch._inductor.exc import InvalidCxxCompiler

    assert explain(InvalidCxxCompiler()).startswith("no working C++ compiler found")


@pytest.mark.parametrize("kind", ["linker", "oserror"])
def test_a_full_disk_is_named_with_its_folder_and_the_fix(kind: str) -> None:
    folder = "/data/cache/inductor/oy"
    if kind == "linker":
        exc = _cpp_error(
            ["g++", f"{folder}/c.main.cpp", "-o", f"{folder}/c.main.so"],
            "In file included from x.h:1:\n/usr/bin/ld: final link failed: No space left on "
            "device\ncollect2: error: ld returned 1 exit status\n",
        )
    else:
        exc = OSError(errno.ENOSPC, "No space left on device", f"{folder}/c.py")
    message = explain(exc)
    assert message.startswith("no space left on device") and folder in message
    assert "no working C++ compiler" not in message and "free space" in message


# --------------------------------------------------------------------------------------------
# What the cache repair removes
# --------------------------------------------------------------------------------------------


def test_a_compile_error_about_something_else_removes_no_cached_file(tmp_path: Path) -> None:
    calls: list[int] = []
    with InductorCache(tmp_path / "c") as cache:
        source = _stored(cache.inductor_dir / "sr" / "c1.main.cpp")
        cmd = ["g++", str(source), "-o", str(source.with_suffix(".so"))]

        def unquoted() -> None:  # the compiler complains about its command, not the file
            calls.append(1)
            raise _cpp_error(cmd, "g++: fatal error: input file '/x' is the same as output file")

        def full() -> None:
            calls.append(2)
            raise OSError(errno.ENOSPC, "No space left on device", str(source))

        with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):
            call_repairing(cache, unquoted)
        with pytest.raises(OSError, match="No space left"):
            call_repairing(cache, full)
        assert source.exists() and cache.statistics().repairs == 0
        assert calls == [1, 2]

        def corrupt() -> str:  # the compiler complains about the cached file's contents
            calls.append(3)
            if source.exists():
                raise _cpp_error(cmd, f"{source}:1:22: error: expected '}}' at end of input")
            return "compiled"

        assert call_repairing(cache, corrupt) == "compiled"
        assert not source.exists() and cache.statistics().repairs == 1


@pytest.mark.parametrize("found_by", ["module", "cache-folder"])
def test_a_module_cut_short_is_mapped_to_its_cached_file_and_repaired(
    tmp_path: Path, found_by: str
) -> None:
    key = "cab12shortmodule"
    name = f"torch._inductor.runtime.compile_tasks.{key}"
    with InductorCache(tmp_path / "c") as cache:
        path = _stored(cache.inductor_dir / key[1:3] / f"{key}.py", "# AOT ID: ['0_inf")
        if found_by == "module":
            module = types.ModuleType(name)
            module.__file__ = str(path)
            sys.modules[name] = module
        attempts: list[bool] = []

        def load() -> str:
            attempts.append(path.exists())
            if path.exists():
                try:  # what inductor raises, wrapped by dynamo
                    raise AttributeError(f"module {name!r} has no attribute 'call'")
                except AttributeError as exc:
                    raise RuntimeError(
                        f"backend='inductor' raised:\nAttributeError: {exc}"
                    ) from exc
            return "compiled again"

        try:
            assert call_repairing(cache, load) == "compiled again"
        finally:
            sys.modules.pop(name, None)
        assert attempts == [True, False] and cache.statistics().repairs == 1


_TRUNCATED_CHILD = r"""
import json, torch, fastinfer
from fastinfer import testing
with fastinfer.InductorCache(CACHE_DIR) as cache:
    model = testing.tiny_mlp()
    compiled = fastinfer.compile_model(model, torch.randn(2, 32), cache=cache)
    x = torch.randn(1, 32)
    torch.testing.assert_close(compiled(x), model(x))
    print("RESULT " + json.dumps({"hits": compiled.statistics().cache_hits,
                                  "repairs": cache.statistics().repairs}))
"""


@pytest.mark.slow
@pytest.mark.timeout(560)
def test_a_restart_repairs_generated_modules_cut_short_to_valid_python(tmp_path: Path) -> None:
    cache = tmp_path / "c"

    def start() -> dict[str, Any]:
        code = _TRUNCATED_CHILD.replace("CACHE_DIR", repr(str(cache)))
        proc = run_python(code, timeout=240, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, proc.stdout + proc.stderr
        return dict(json.loads(lines[-1][len("RESULT ") :]))

    start()  # cold: one real compile
    modules = [p for p in (cache / "inductor").rglob("*.py") if "locks" not in p.parts]
    assert modules
    for p in modules:
        p.write_text(p.read_text()[:20])  # still valid Python: a comment, no `call`
        os.utime(p, _OLD)
    out = start()
    assert out["repairs"] >= 1 and out["hits"] >= 1
    assert start()["repairs"] == 0  # repaired for good


# --------------------------------------------------------------------------------------------
# Entering the cache
# --------------------------------------------------------------------------------------------


def _fake_isa(monkeypatch: pytest.MonkeyPatch, library: Path, probed: list[str]) -> None:
    """Inductor's ISA probe, reduced to one test library (no child processes)."""

    class VecISA:
        def _probe_load(self, output_path: str) -> bool:
            probed.append(output_path)
            return True

    @functools.cache
    def valid_vec_isa_list() -> list[Any]:
        return []

    def pick_vec_isa() -> None:
        library.parent.mkdir(parents=True, exist_ok=True)
        library.touch()
        VecISA()._probe_load(str(library))

    fake = types.SimpleNamespace(
        VecISA=VecISA, valid_vec_isa_list=valid_vec_isa_list, pick_vec_isa=pick_vec_isa
    )
    monkeypatch.setattr(fastinfer._torch_compat, "inductor_cpu_vec_isa", lambda: fake)


@pytest.mark.parametrize(
    "text", ["[]", '"avx"', "5", "null", '{"x.so": [1]}', "{cut"], ids=lambda t: t
)
def test_a_damaged_isa_probe_record_is_ignored_and_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    folder = tmp_path / "c"
    with InductorCache(folder):
        pass
    (folder / "isa-probe.json").write_text(text)
    probed: list[str] = []
    _fake_isa(monkeypatch, folder / "inductor" / "ab" / "x.so", probed)
    with InductorCache(folder) as cache:
        assert cache.active
    assert probed  # probed for real: the record said nothing usable
    assert json.loads((folder / "isa-probe.json").read_text()) == {"x.so": True}


def test_a_failure_inside_enter_restores_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastinfer import _torch_compat

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/before")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    fx_cache = _torch_compat.inductor_config().fx_graph_cache

    def boom(self: InductorCache) -> None:
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(InductorCache, "_replay_isa_probe", boom)
    cache = InductorCache(tmp_path / "c")
    with pytest.raises(RuntimeError, match="probe exploded"):
        cache.__enter__()
    assert not cache.active and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/before"
    assert "TRITON_CACHE_DIR" not in os.environ
    assert _torch_compat.inductor_config().fx_graph_cache == fx_cache


def test_replace_rebuilds_a_manifest_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).mkdir()
    with InductorCache(tmp_path, on_mismatch="replace") as cache:
        assert cache.manifest() is not None


def test_a_lock_file_that_is_a_folder_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / ".fastinfer.lock").mkdir()
    with pytest.raises(ConfigError) as info, InductorCache(tmp_path):
        pass
    assert str(tmp_path / ".fastinfer.lock") in str(info.value) and "remove it" in str(info.value)


def test_a_full_disk_on_entry_is_a_config_error_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Any, doc: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("fastinfer.compiling._cache.atomic_write_json", full)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = InductorCache(tmp_path / "c")
    with pytest.raises(ConfigError) as info:
        cache.__enter__()
    assert "No space left on device" in str(info.value) and str(tmp_path / "c") in str(info.value)
    assert "free space" in str(info.value) and not cache.active
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_a_home_that_cannot_be_expanded_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTINFER_CACHE_DIR", "~fastinfer-no-such-user/x")
    with pytest.raises(ConfigError, match="~fastinfer-no-such-user/x"):
        InductorCache()


# --------------------------------------------------------------------------------------------
# Bundles and AOT packages
# --------------------------------------------------------------------------------------------


def _bundle(tmp_path: Path, member: tarfile.TarInfo, data: bytes | None = None) -> Path:
    with InductorCache(tmp_path / "src") as cache:
        manifest = cache.manifest_path.read_bytes()
    path = tmp_path / f"{member.name.replace('/', '_')}.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("inductor/../../../ESCAPED"),
        _member("inductor/link", tarfile.SYMTYPE, "/etc/passwd"),
        _member("inductor/dev", tarfile.CHRTYPE),
    ],
    ids=["traversal", "absolute-symlink", "device"],
)
@pytest.mark.parametrize("into", ["new", "existing"])
def test_an_unsafe_bundle_member_is_a_config_error(
    tmp_path: Path, member: tarfile.TarInfo, into: str
) -> None:
    bundle = _bundle(tmp_path, member, b"abc" if member.isfile() else None)
    dest = tmp_path / "dest" / "c"
    if into == "existing":
        with InductorCache(dest):
            pass
    with pytest.raises(ConfigError) as info:
        InductorCache.import_(bundle, dest)
    assert str(bundle) in str(info.value) and "InductorCache.export" in str(info.value)
    assert not list(tmp_path.rglob("ESCAPED"))
    assert not [
        p for p in dest.parent.iterdir() if p.name.startswith(".c.") and "lock" not in p.name
    ]


def _package(tmp_path: Path, manifest: bytes | None) -> Path:
    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data/aotinductor/model/x.wrapper.so", b"\x7fELF")
        if manifest is not None:
            zf.writestr("model/extra/fastinfer-manifest.json", manifest)
    return path


@pytest.mark.parametrize(
    "manifest", [None, b"null", b"\xff\xfe{", b"[]"], ids=["missing", "null", "garbage", "list"]
)
def test_an_aot_package_without_a_usable_manifest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest: bytes | None
) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(
        fastinfer._torch_compat, "aoti_load_package_runner", lambda p: loaded.append(p) or len
    )
    package = _package(tmp_path, manifest)
    with pytest.raises(CacheMismatchError) as info:
        fastinfer.load_aot(package)
    message = str(info.value)
    assert str(package) in message and "re-export it with this fastinfer" in message
    assert "check_environment=False" in message and not loaded
    assert fastinfer.load_aot(package, check_environment=False).statistics().backend == "aot"


def test_load_aot_of_a_folder_says_it_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a folder, not a \.pt2 file"):
        fastinfer.load_aot(tmp_path)


# --------------------------------------------------------------------------------------------
# Destinations checked before compiling
# --------------------------------------------------------------------------------------------


def _unwritable(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("")
    return {
        "a-folder": tmp_path,
        "under-a-file": tmp_path / "a-file" / "out",
        "proc": Path("/proc/fastinfer-out"),
    }


@pytest.mark.parametrize("where", ["a-folder", "under-a-file", "proc"])
def test_export_aot_checks_the_destination_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    def no_compile(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("compiled before checking the destination")

    monkeypatch.setattr(torch.export, "export", no_compile)
    dest = _unwritable(tmp_path)[where]
    with pytest.raises(ConfigError) as info:
        fastinfer.export_aot(testing.tiny_mlp(), torch.randn(2, 32), dest)
    assert str(dest) in str(info.value)
    assert ("is a folder" if where == "a-folder" else "not writable here") in str(info.value)


@pytest.mark.parametrize("where", ["a-folder", "under-a-file", "proc"])
def test_cache_export_checks_the_destination(tmp_path: Path, where: str) -> None:
    with InductorCache(tmp_path / "c") as cache:
        dest = _unwritable(tmp_path / "c" / "inductor")[where]
        with pytest.raises(ConfigError) as info:
            cache.export(dest)
    assert str(dest) in str(info.value)


def test_cli_warm_refuses_an_unwritable_bundle_before_compiling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastinfer.__main__ import main

    def no_compile(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("compiled before checking the destination")

    monkeypatch.setattr("fastinfer.compiling.compile_model", no_compile)
    argv = ["warm", "fastinfer.testing:tiny_mlp", "--input", "float32[B,32]"]
    assert main([*argv, "--bundle", "/proc/fastinfer-x.tar"]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"fastinfer warm: error: cannot write the cache bundle .*", err), err
    assert "/proc/fastinfer-x.tar" in err and "Traceback" not in err
