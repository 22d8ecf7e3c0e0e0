"""The loader under faults: files that change while they load, and malformed or special files.

A checkpoint truncated while a process maps it must end in :class:`CheckpointError`, never SIGBUS
(which no Python code can catch): those scenarios run in a fresh interpreter whose exit status the
test checks, so a regression kills the child, not the test run. Each scenario truncates or removes
the file through a hook at a fixed point of the load (no timing involved).
"""

from __future__ import annotations

import errno
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


# --------------------------------------------------------------------------------------------
# Dtypes: what dtype= cannot resolve, and every dtype of the safetensors format
# --------------------------------------------------------------------------------------------


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 2)
        self.register_buffer("position_ids", torch.arange(6))  # int64 in model and file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x)


@pytest.mark.parametrize(
    "src_dtype",
    [torch.int8, torch.bool, torch.int64, torch.complex64],
    ids=["int8", "bool", "int64", "complex64"],
)
@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["dtype-None", "dtype-float32"])
def test_a_non_floating_checkpoint_is_refused_for_floating_parameters(
    src_dtype: torch.dtype, dtype: torch.dtype | None, tmp_path: Path
) -> None:
    """dtype= casts floating tensors only: an int8 export never becomes a float weight silently."""
    sd = {
        k: (v * 10).to(src_dtype) if v.is_floating_point() else v
        for k, v in Lin().state_dict().items()
    }
    path = fastinfer.save_weights(sd, tmp_path / "q.safetensors")
    with pytest.raises(fastinfer.StateDictMismatch) as info:
        fastinfer.load_model(Lin, path, dtype=dtype)
    msg = str(info.value)
    assert f"l.weight: checkpoint dtype {src_dtype} vs model dtype torch.float32" in msg
    assert "position_ids" not in msg  # int64 in both: fits
    assert "casts floating-point tensors only" in msg and "pass dtype=" not in msg


def test_a_floating_checkpoint_is_refused_for_an_integer_buffer_even_with_dtype(
    tmp_path: Path,
) -> None:
    sd = dict(Lin().state_dict())
    sd["position_ids"] = sd["position_ids"].float()
    path = fastinfer.save_weights(sd, tmp_path / "f.safetensors")
    with pytest.raises(
        fastinfer.StateDictMismatch,
        match=r"position_ids: checkpoint dtype torch.float32 vs model dtype torch.int64",
    ):
        fastinfer.load_model(Lin, path, dtype=torch.float16)


def test_integer_buffers_keep_their_dtype_when_floats_are_cast(tmp_path: Path) -> None:
    eager = Lin()
    path = fastinfer.save_weights(eager, tmp_path / "m.safetensors")
    model = fastinfer.load_model(Lin, path, dtype=torch.float16)
    assert model.l.weight.dtype == torch.float16 and model.l.weight.requires_grad
    assert model.position_ids.dtype == torch.int64
    assert torch.equal(model.position_ids, eager.position_ids)


def test_a_dtype_mismatch_between_floats_still_suggests_dtype(tmp_path: Path) -> None:
    path = fastinfer.save_weights(Lin().half(), tmp_path / "h.safetensors")
    with pytest.raises(fastinfer.StateDictMismatch, match="pass dtype= to cast"):
        fastinfer.load_model(Lin, path)


def _st_dtypes() -> list[Any]:
    names = [
        "bool", "uint8", "int8", "int16", "uint16", "float16", "bfloat16", "int32", "uint32",
        "float32", "complex64", "float64", "int64", "uint64", "float8_e5m2", "float8_e4m3fn",
        "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2",
    ]  # fmt: skip
    return [
        pytest.param(getattr(torch, n), id=n)
        if hasattr(torch, n)
        else pytest.param(None, id=n, marks=pytest.mark.skip(reason=f"torch has no {n}"))
        for n in names
    ]


@pytest.mark.parametrize("dtype", _st_dtypes())
def test_every_safetensors_dtype_torch_has_round_trips(dtype: torch.dtype, tmp_path: Path) -> None:
    """save_weights writes it; the loader reads it bit for bit, as the safetensors library does."""
    raw = torch.arange(24, dtype=torch.uint8).reshape(3, 8)
    value = raw.view(dtype) if dtype.itemsize == 1 else torch.arange(24).reshape(3, 8).to(dtype)
    eager = nn.Module()
    eager.register_buffer("x", value)
    path = fastinfer.save_weights(eager, tmp_path / "x.safetensors")
    model = nn.Module()
    model.register_buffer("x", torch.empty(value.shape, dtype=dtype))
    fastinfer.load_weights_(model, path)
    assert model.x.dtype == dtype and model.x.shape == value.shape
    assert torch.equal(model.x.view(torch.uint8), value.view(torch.uint8))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["x"].view(torch.uint8), value.view(torch.uint8))


@pytest.mark.parametrize("name", ["F6_E2M3", "F6_E3M2", "F33"])
def test_a_dtype_the_loader_cannot_hold_is_unsupported_not_corrupt(
    name: str, tmp_path: Path
) -> None:
    path = _write_safetensors(
        tmp_path / "x.safetensors",
        {"a": {"dtype": name, "shape": [4], "data_offsets": [0, 3]}, "b": _entry([4], 16, 32)},
        bytes(32),
    )
    with pytest.raises(CheckpointError, match=f"tensor 'a' has .*dtype '{name}'") as info:
        fastinfer.load_weights_(Pair(), path)
    msg = str(info.value)
    assert "corrupt" not in msg and "not supported" in msg
    if name.startswith("F6"):
        assert "torch" in msg and "safetensors format defines" in msg


def test_an_f4_tensor_with_an_odd_last_dimension_is_refused(tmp_path: Path) -> None:
    path = _write_safetensors(
        tmp_path / "x.safetensors",
        {"a": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}, "b": _entry([4], 16, 32)},
        bytes(32),
    )
    with pytest.raises(CheckpointError, match=r"tensor 'a' .*F4.*last dimension"):
        fastinfer.load_weights_(Pair(), path)


# --------------------------------------------------------------------------------------------
# Parameters that share storage (two Parameters, one tensor) through safetensors
# --------------------------------------------------------------------------------------------


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
@pytest.mark.parametrize("view", ["same", "transposed"])
def test_parameters_sharing_storage_survive_a_safetensors_round_trip(
    strict: bool, view: str, tmp_path: Path
) -> None:
    eager = Two()
    eager.b.weight.data = eager.a.weight.data if view == "same" else eager.a.weight.data.t()
    path = fastinfer.save_weights(eager, tmp_path / "two.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == ({"a.weight"} if view == "same" else {"a.weight", "b.weight"})
    model = fastinfer.load_model(Two, path, strict=strict)
    assert torch.equal(model.a.weight, eager.a.weight)
    assert torch.equal(model.b.weight, eager.b.weight)
    if view == "same":  # one storage again, two Parameters as in the eager model
        assert model.a.weight is not model.b.weight
        assert model.a.weight.data_ptr() == model.b.weight.data_ptr()


def test_a_file_without_the_alias_record_still_reports_the_key_missing(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(4, 4)}, str(tmp_path / "one.safetensors"))
    with pytest.raises(
        fastinfer.StateDictMismatch, match=r"missing from the checkpoint \(1\):\s+b.weight"
    ):
        fastinfer.load_model(Two, tmp_path / "one.safetensors")


def test_a_malformed_alias_record_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"a.weight": torch.ones(4, 4)}, str(path), metadata={"fastinfer.aliases": "[1]"})
    with pytest.raises(CheckpointError, match=r"'fastinfer\.aliases' is not a JSON object"):
        fastinfer.load_model(Two, path)


# --------------------------------------------------------------------------------------------
# Shard indexes: an index names files in its own folder, nowhere else
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["dotdot", "absolute", "dotdot-inside"])
def test_a_shard_index_cannot_name_files_outside_its_folder(where: str, tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    lin = nn.Linear(4, 2)
    fastinfer.save_weights({"weight": lin.weight}, tmp_path / "ckpt" / "w.safetensors")
    fastinfer.save_weights({"bias": lin.bias}, tmp_path / "elsewhere" / "b.safetensors")
    name = {
        "dotdot": "../elsewhere/b.safetensors",
        "absolute": str(tmp_path / "elsewhere" / "b.safetensors"),
        "dotdot-inside": "sub/../../elsewhere/b.safetensors",
    }[where]
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"weight": "w.safetensors", "bias": name}})
    )
    with pytest.raises(CheckpointError, match="outside its folder") as info:
        fastinfer.load_model(nn.Linear, tmp_path / "ckpt", 4, 2)
    assert repr(name) in str(info.value)


def test_a_symlinked_shard_inside_the_folder_still_loads(tmp_path: Path) -> None:
    """The Hugging Face cache layout: snapshots/<rev>/<shard> -> ../../blobs/<hash>."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    lin = nn.Linear(4, 2)
    fastinfer.save_weights(lin, blobs / "0123abcd", format="safetensors")
    os.symlink("../../blobs/0123abcd", snap / "model-00001.safetensors")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"weight": "model-00001.safetensors", "bias": "model-00001.safetensors"}}
        )
    )
    model = fastinfer.load_model(nn.Linear, snap, 4, 2)
    assert torch.equal(model.weight, lin.weight) and torch.equal(model.bias, lin.bias)


# --------------------------------------------------------------------------------------------
# save_weights on a full disk
# --------------------------------------------------------------------------------------------


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["safetensors", "torch", "fsync"])
def test_save_weights_on_a_full_disk_names_the_path_and_keeps_the_old_file(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the new file is written (simulated): a CheckpointError naming the
    path, the cause and the fix; the previous checkpoint is untouched and no temp file is left."""
    suffix = "pt" if where == "torch" else "safetensors"
    target = tmp_path / f"m.{suffix}"
    old = nn.Linear(8, 8)
    fastinfer.save_weights(old, target)
    if where == "safetensors":
        import safetensors.torch
        from safetensors import SafetensorError

        def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            Path(filename).write_bytes(b"\0" * 100)  # part of the file made it to disk
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif where == "torch":

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            f.write(b"PK\x03\x04" + b"\0" * 100)
            try:  # what torch does: the OSError from write() becomes the context of its own error
                raise _enospc()
            except OSError:
                raise RuntimeError(  # noqa: B904 (torch chains it implicitly)
                    "[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662"
                )

        monkeypatch.setattr(torch, "save", save)
    else:

        def fsync(fd: int) -> None:
            raise _enospc()

        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError) as info:
        fastinfer.save_weights(nn.Linear(256, 256), target)
    monkeypatch.undo()
    msg = str(info.value)
    assert repr(str(target)) in msg
    assert "No space left on device" in msg and "ENOSPC" in msg
    assert "free space" in msg and "save it elsewhere" in msg
    assert os.listdir(tmp_path) == [target.name]  # no temporary file left behind
    model = fastinfer.load_model(nn.Linear, target, 8, 8)
    assert torch.equal(model.weight, old.weight)


_FSIZE_CHILD = r"""
import os, resource, signal, sys
import torch
import fastinfer
from torch import nn

root = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
old = nn.Linear(8, 8)
for suffix in ("safetensors", "pt"):
    fastinfer.save_weights(old, os.path.join(root, "m." + suffix))
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
for suffix in ("safetensors", "pt"):
    target = os.path.join(root, "m." + suffix)
    try:
        fastinfer.save_weights(nn.Linear(256, 256), target)
        print("SAVED", suffix)
    except fastinfer.CheckpointError as exc:
        print("ERROR", suffix, repr(target) in str(exc), "EFBIG" in str(exc), str(exc).replace("\n", " "))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("LEFT", sorted(os.listdir(root)))
for suffix in ("safetensors", "pt"):
    m = fastinfer.load_model(nn.Linear, os.path.join(root, "m." + suffix), 8, 8)
    print("OLD", suffix, torch.equal(m.weight, old.weight))
"""


def test_save_weights_past_a_file_size_limit_uses_the_real_writers(tmp_path: Path) -> None:
    """Unprivileged and real: RLIMIT_FSIZE makes the real safetensors and torch writers fail with
    EFBIG part way through (as ENOSPC does on a full disk)."""
    proc = run_python(_FSIZE_CHILD.replace("sys.argv[1]", repr(str(tmp_path))), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for suffix in ("safetensors", "pt"):
        err = next(x for x in lines if x.startswith(f"ERROR {suffix} ") or x == f"SAVED {suffix}")
        assert err.startswith(f"ERROR {suffix} True True"), err
        assert f"OLD {suffix} True" in lines
    assert "LEFT ['m.pt', 'm.safetensors']" in lines, proc.stdout


def test_a_safetensors_header_whose_length_starts_with_0x80_is_not_taken_for_a_pickle(
    tmp_path: Path,
) -> None:
    """A header of 128 bytes (mod 256) begins with the byte of a pickle's PROTO opcode."""
    key = "k" * 68  # save_file pads this header to 128 bytes
    from safetensors.torch import save_file

    save_file({key: torch.arange(2.0)}, str(tmp_path / "x.safetensors"))
    assert (tmp_path / "x.safetensors").read_bytes()[:1] == b"\x80"
    assert fmt.sniff(tmp_path / "x.safetensors") == "safetensors"
    model = nn.Module()
    model.register_buffer(key, torch.zeros(2))
    report = fastinfer.load_weights_(model, tmp_path / "x.safetensors")
    assert report.format == "safetensors" and torch.equal(getattr(model, key), torch.arange(2.0))


# -- models whose __init__ reads parameter values (outside probe, round 5) ------------------------


class _ReadsAWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = float(self.lin.weight.abs().max())  # no data under empty_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class _DerivedBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("wt", self.lin.weight.detach().t().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wt


def test_a_model_whose_init_reads_a_weight_gets_a_load_error_with_the_fix(tmp_path: Path) -> None:
    # Before: torch's raw "RuntimeError: Tensor.item() cannot be called on meta tensors".
    path = tmp_path / "m.safetensors"
    fastinfer.save_weights(_ReadsAWeight(), path)
    with pytest.raises(
        fastinfer.LoadError, match=r"_ReadsAWeight\(\.\.\.\) failed when built"
    ) as e:
        fastinfer.load_model(_ReadsAWeight, path)
    assert "load_weights_(model, checkpoint)" in str(e.value)
    assert isinstance(e.value, RuntimeError)  # code catching torch's error still catches it
    model = _ReadsAWeight()
    fastinfer.load_weights_(model, path)  # the fix it names works


def test_a_buffer_computed_from_a_weight_in_init_names_that_cause(tmp_path: Path) -> None:
    # Before: the fix given was "build the model under fastinfer.empty_init()", which
    # load_model had done.
    path = tmp_path / "m.safetensors"
    fastinfer.save_weights(_DerivedBuffer(), path)
    with pytest.raises(fastinfer.StateDictMismatch, match="computed the buffer from a parameter"):
        fastinfer.load_model(_DerivedBuffer, path)


def test_a_models_own_error_in_init_is_not_rewrapped(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    fastinfer.save_weights(nn.Linear(2, 2), path)

    for message in ("the user's own bug", "metadata file missing"):  # "meta" inside a word

        def broken(message: str = message) -> nn.Module:
            raise RuntimeError(message)

        with pytest.raises(RuntimeError, match=f"^{message}$") as e:
            fastinfer.load_model(broken, path)
        assert not isinstance(e.value, fastinfer.LoadError)
