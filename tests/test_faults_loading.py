"""The loader under faults: files that change while they load, and malformed or special files.

A checkpoint truncated while a process maps it must end in :class:`CheckpointError`, never SIGBUS
(which no Python code can catch): those scenarios run in a fresh interpreter whose exit status the
test checks, so a regression kills the child, not the test run. Each scenario truncates or removes
the file through a hook at a fixed point of the load (no timing involved).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_python
from torch import nn

import fastinfer
from fastinfer import CheckpointError, testing
from fastinfer.loading import _formats as fmt

pytestmark = pytest.mark.timeout(120)

# --------------------------------------------------------------------------------------------
# A checkpoint that changes while it loads (each scenario in a fresh process: SIGBUS kills it)
# --------------------------------------------------------------------------------------------

_CHILD = r"""
import json, os, sys, shutil
from pathlib import Path
from unittest import mock
import torch
import fastinfer
from fastinfer import testing
from fastinfer import testing
from fastinfer.loading import _formats as fmt, _load

kind, root = sys.argv[1], Path(sys.argv[2])
model = testing.tiny_mlp(hidden=256)
sd = model.state_dict()


def make(name):
    '''A fresh checkpoint of `kind` under root/name; returns (path to load, file to damage).'''
    where = root / name
    where.mkdir()
    if kind == "safetensors":
        fastinfer.save_weights(sd, where / "m.safetensors")
        return where / "m.safetensors", where / "m.safetensors"
    if kind == "torch-zip":
        torch.save(sd, where / "m.pt")
        return where / "m.pt", where / "m.pt"
    if kind == "torch-legacy":
        torch.save(sd, where / "m.pt", _use_new_zipfile_serialization=False)
        return where / "m.pt", where / "m.pt"
    keys = sorted(sd)
    half = len(keys) // 2
    suffix, index = (
        ("safetensors", "model.safetensors.index.json")
        if kind == "sharded-safetensors"
        else ("bin", "pytorch_model.bin.index.json")
    )
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        shard = where / f"shard-{i}.{suffix}"
        fastinfer.save_weights({k: sd[k] for k in part}, shard, format="torch" if suffix == "bin" else None)
        weight_map.update({k: shard.name for k in part})
    (where / index).write_text(json.dumps({"weight_map": weight_map}))
    return where, where / f"shard-1.{suffix}"


def damage(path, how):
    if how == "truncate":
        os.truncate(path, 64)
    else:
        os.remove(path)


def attempt(name, how, hook, **options):
    ckpt, victim = make(name)
    with fastinfer.empty_init():
        target = testing.TinyMLP(32, 256, 8, 2)
    with hook(victim, how):
        try:
            fastinfer.load_weights_(target, ckpt, **options)
        except Exception as exc:
            return {"error": type(exc).__name__, "message": str(exc), "victim": str(victim)}
    return {"error": None, "victim": str(victim)}


def after_map(victim, how):  # between mapping the files and assigning any tensor
    original = fmt.read
    def read(*args, **kwargs):
        out = original(*args, **kwargs)
        damage(victim, how)
        return out
    return mock.patch.object(fmt, "read", read)


def before_populate(victim, how):  # after assigning, before the pages are faulted in
    original = _load._check_no_meta
    def check(*args, **kwargs):
        original(*args, **kwargs)
        damage(victim, how)
    return mock.patch.object(_load, "_check_no_meta", check)


def during_read(victim, how):  # torch.load has read the file, the reader has not returned
    original = torch.load
    def load(*args, **kwargs):
        out = original(*args, **kwargs)
        damage(victim, how)
        return out
    return mock.patch.object(torch, "load", load)


if kind == "torch-legacy":  # read into memory, never mapped: only a change during the read counts
    results = {
        "truncated during read": attempt("a", "truncate", during_read),
        "removed during read": attempt("b", "remove", during_read),
    }
    ok = attempt("c", "truncate", after_map)  # read completely before: the tensors are intact
    assert ok["error"] is None, ok
else:
    results = {
        "truncated after map": attempt("a", "truncate", after_map),
        "truncated after map, cast": attempt("b", "truncate", after_map, dtype=torch.float16),
        "truncated before populate": attempt("c", "truncate", before_populate),
        "removed after map": attempt("d", "remove", after_map),
    }
    if kind == "torch-zip":
        results["truncated during read, mmap=False"] = attempt("e", "truncate", during_read, mmap=False)
print("RESULTS " + json.dumps(results), flush=True)
"""


@pytest.mark.parametrize(
    "kind",
    ["safetensors", "torch-zip", "torch-legacy", "sharded-safetensors", "sharded-torch"],
)
def test_a_checkpoint_truncated_or_removed_while_it_loads_raises_checkpoint_error(
    kind: str, tmp_path: Path
) -> None:
    proc = run_python(
        _CHILD.replace("sys.argv[1]", repr(kind)).replace("sys.argv[2]", repr(str(tmp_path))),
        check=False,
    )
    assert proc.returncode == 0, (
        f"the loading process died with {proc.returncode} (-7 is SIGBUS)\n{proc.stderr[-3000:]}"
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results: dict[str, dict[str, Any]] = json.loads(line.removeprefix("RESULTS "))
    for scenario, r in results.items():
        assert r["error"] == "CheckpointError", (scenario, r)
        assert repr(r["victim"]) in r["message"], (scenario, r["message"])
        assert "while it was being loaded" in r["message"], (scenario, r["message"])
        word = "removed" if scenario.startswith("removed") else "truncated"
        assert word in r["message"], (scenario, r["message"])
        assert "rename it over the old one" in r["message"]  # the fix


_EFAULT_CHILD = r"""
import os, sys
import fastinfer
from fastinfer import testing
from fastinfer import testing
from fastinfer.loading import _formats as fmt

path = sys.argv[1]
fastinfer.save_weights(testing.tiny_mlp(hidden=256).state_dict(), path)
mapped = fmt.read("safetensors", [fmt.Path(path)], mmap=True, trust_pickle=False, progress=False)
os.truncate(path, 64)
try:
    fmt.populate(list(mapped.tensors.values()))
except fastinfer.CheckpointError as exc:
    print("CheckpointError:", exc)
"""


def test_populate_treats_efault_as_pages_gone_and_never_touches_them(tmp_path: Path) -> None:
    """The last line of defence: the file shrank after every check, while the pages are faulted
    in. madvise(MADV_POPULATE_READ) fails with EFAULT; touching the pages then would be SIGBUS."""
    path = str(tmp_path / "m.safetensors")
    proc = run_python(_EFAULT_CHILD.replace("sys.argv[1]", repr(path)), check=False)
    assert proc.returncode == 0, (
        f"died with {proc.returncode} (-7 is SIGBUS)\n{proc.stderr[-2000:]}"
    )
    assert "CheckpointError:" in proc.stdout and "EFAULT" in proc.stdout, proc.stdout


def test_a_file_removed_between_finding_and_reading_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    fastinfer.save_weights(testing.tiny_mlp().state_dict(), path)
    original = fmt.resolve

    def resolve(checkpoint: Any) -> Any:
        out = original(checkpoint)
        path.unlink()
        return out

    monkeypatch.setattr(fmt, "resolve", resolve)
    with fastinfer.empty_init():
        model = testing.TinyMLP(32, 64, 8, 2)
    with pytest.raises(CheckpointError, match="disappeared while the checkpoint was being loaded"):
        fastinfer.load_weights_(model, path)


# --------------------------------------------------------------------------------------------
# Malformed safetensors headers and special files
# --------------------------------------------------------------------------------------------


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4))
        self.b = nn.Parameter(torch.zeros(4))


def _write_safetensors(path: Path, header: dict[str, Any] | str, data: bytes) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def test_overlapping_tensors_are_refused_not_aliased(tmp_path: Path) -> None:
    path = _write_safetensors(
        tmp_path / "overlap.safetensors",
        {"a": _entry([4], 0, 16), "b": _entry([4], 8, 24)},
        bytes(24),
    )
    with pytest.raises(
        CheckpointError, match=r"tensors 'a' \(bytes 0-16\) and 'b' \(bytes 8-24\) overlap"
    ):
        fastinfer.load_weights_(Pair(), path)


def test_tensors_that_touch_but_do_not_overlap_still_load(tmp_path: Path) -> None:
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    path = _write_safetensors(
        tmp_path / "ok.safetensors", {"b": _entry([4], 16, 32), "a": _entry([4], 0, 16)}, data
    )
    model = Pair()
    fastinfer.load_weights_(model, path)
    assert model.a.tolist() == [0, 1, 2, 3] and model.b.tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([-2, -2], r"tensor 'a' has a negative dimension -2 in its shape \[-2, -2\]"),
        ([2.5, 2], r"tensor 'a' has a non-integer dimension 2.5 in its shape \[2.5, 2\]"),
        ([2.0, 2], r"tensor 'a' has a non-integer dimension 2.0"),
        ("4", r"tensor 'a' has a shape of type str"),
        ([True, 4], r"tensor 'a' has a non-integer dimension True"),
    ],
    ids=["negative", "float", "integral-float", "string", "bool"],
)
def test_bad_shapes_name_the_tensor_and_the_problem(shape: Any, match: str, tmp_path: Path) -> None:
    path = _write_safetensors(
        tmp_path / "bad.safetensors",
        {"a": _entry(shape, 0, 16), "b": _entry([4], 16, 32)},
        bytes(32),
    )
    with pytest.raises(CheckpointError, match=match):
        fastinfer.load_weights_(Pair(), path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}, "unknown dtype 'F33'"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [4]}, "no 'data_offsets'"),
        ([1, 2], "header entry of type list"),
    ],
    ids=["dtype", "reversed-offsets", "float-offset", "missing-offsets", "not-an-object"],
)
def test_bad_header_entries_name_the_tensor(entry: Any, match: str, tmp_path: Path) -> None:
    path = _write_safetensors(
        tmp_path / "bad.safetensors", {"a": entry, "b": _entry([4], 16, 32)}, bytes(32)
    )
    with pytest.raises(CheckpointError, match=f"tensor 'a' .*{match}"):
        fastinfer.load_weights_(Pair(), path)


def test_a_deeply_nested_header_is_a_checkpoint_error(tmp_path: Path) -> None:
    depth = 200_000
    path = _write_safetensors(
        tmp_path / "deep.safetensors", '{"a":' * depth + "1" + "}" * depth, b""
    )
    with pytest.raises(CheckpointError, match="nested too deeply"):
        fastinfer.load_weights_(Pair(), path)


def test_a_header_past_the_format_limit_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{")
    with pytest.raises(CheckpointError, match="more than the format's limit"):
        fastinfer.load_weights_(Pair(), path)


@pytest.mark.timeout(30)  # before the fix, opening the pipe blocked forever
def test_a_named_pipe_is_refused_up_front(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is a named pipe"):
        fastinfer.load_weights_(Pair(), fifo)


@pytest.mark.timeout(30)
def test_a_named_pipe_as_a_shard_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "shard-0.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "shard-0.safetensors", "b": "shard-0.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"shard .*shard-0.safetensors' is a named pipe"):
        fastinfer.load_weights_(Pair(), tmp_path)


def test_a_symlink_loop_is_called_a_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "model.safetensors"
    os.symlink(loop.name, loop)
    with pytest.raises(CheckpointError, match="is a symlink loop"):
        fastinfer.load_weights_(Pair(), loop)


def test_a_dangling_symlink_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "model.safetensors"
    os.symlink(tmp_path / "gone.safetensors", link)
    with pytest.raises(
        CheckpointError, match=r"is a symbolic link to .*gone.safetensors', which does not exist"
    ):
        fastinfer.load_weights_(Pair(), link)
