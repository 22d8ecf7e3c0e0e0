"""The loader under faults, continued: safetensors headers the safetensors library refuses (holes,
trailing bytes, non-string metadata, duplicate keys), ``device="meta"``, and a damaged
``config.json`` for ``load_pretrained``. Each is a :class:`CheckpointError` or
:class:`ConfigError` that names the file or option, what is wrong and the fix."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import CheckpointError, ConfigError

pytestmark = pytest.mark.timeout(120)


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(2))


def _entry(begin: int, end: int, shape: list[int] | None = None) -> str:
    return json.dumps({"dtype": "F32", "shape": shape or [2], "data_offsets": [begin, end]})


def _write(path: Path, header: str, nbytes: int) -> Path:
    raw = header.encode()
    data = torch.arange(nbytes // 4, dtype=torch.float32).numpy().tobytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data + bytes(nbytes - len(data)))
    return path


def _library_refuses(path: Path) -> bool:
    from safetensors.torch import load_file

    try:
        load_file(str(path))
    except Exception:
        return True
    return False


# --------------------------------------------------------------------------------------------
# Safetensors headers: as strict as the safetensors library
# --------------------------------------------------------------------------------------------

_REFUSED = {
    # A hole before the first tensor: the data must start at byte 0.
    "gap-first": (
        f'{{"a": {_entry(8, 16)}, "b": {_entry(16, 24)}}}',
        24,
        r"data bytes 0-8 belong to no tensor: a hole before the first tensor",
    ),
    "gap-between": (
        f'{{"a": {_entry(0, 8)}, "b": {_entry(12, 20)}}}',
        20,
        r"data bytes 8-12 belong to no tensor: a hole after tensor 'a' \(bytes 0-8\), "
        r"before tensor 'b'",
    ),
    "zero-size-tensor-past-the-data": (
        f'{{"a": {_entry(0, 8)}, "b": {_entry(8, 16)}, "z": {_entry(20, 20, [0])}}}',
        16,
        r"data bytes 16-20 belong to no tensor.*before tensor 'z'",
    ),
    "zero-size-tensor-inside-another": (
        f'{{"a": {_entry(0, 8)}, "b": {_entry(8, 16)}, "z": {_entry(4, 4, [0])}}}',
        16,
        r"tensors 'a' \(bytes 0-8\) and 'z' \(bytes 4-4\) overlap",
    ),
    "trailing-bytes": (
        f'{{"a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}',
        24,
        r"its last 8 bytes \(from byte \d+ of \d+\) belong to no tensor",
    ),
    "metadata-int-value": (
        f'{{"__metadata__": {{"format": "pt", "n": 1}}, "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}',
        16,
        r"its __metadata__ has 1 value that is not a string \('n' \(int\)\)",
    ),
    "metadata-null-value": (
        f'{{"__metadata__": {{"x": null}}, "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}',
        16,
        r"its __metadata__ has 1 value that is not a string \('x' \(NoneType\)\)",
    ),
    "metadata-list": (
        f'{{"__metadata__": ["pt"], "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}',
        16,
        r"its __metadata__ is a JSON list, not an object of strings",
    ),
    "duplicate-tensor-key": (  # json.loads kept the last 'b' silently: bytes 16-24, not 8-16
        f'{{"a": {_entry(0, 8)}, "b": {_entry(8, 16)}, "b": {_entry(16, 24)}}}',
        24,
        r"its header JSON has the key 'b' twice in one object",
    ),
    "duplicate-field": (
        '{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}, '
        f'"b": {_entry(8, 16)}}}',
        16,
        r"its header JSON has the key 'dtype' twice in one object",
    ),
    "duplicate-metadata": (
        f'{{"__metadata__": {{}}, "__metadata__": {{}}, "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}',
        16,
        r"its header JSON has the key '__metadata__' twice",
    ),
}


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("case", list(_REFUSED), ids=list(_REFUSED))
def test_headers_the_safetensors_library_refuses_are_refused(
    case: str, mmap: bool, tmp_path: Path
) -> None:
    header, nbytes, match = _REFUSED[case]
    path = _write(tmp_path / f"{case}.safetensors", header, nbytes)
    assert _library_refuses(path)  # the rule is the library's, not ours
    with pytest.raises(CheckpointError, match=match) as info:
        fastinfer.load_weights_(Pair(), path, mmap=mmap)
    msg = str(info.value)
    assert repr(str(path)) in msg and "re-save" in msg


def test_a_repeated_tensor_key_is_refused_even_when_both_entries_agree(tmp_path: Path) -> None:
    """The library keeps the last of two equal entries; which one a writer meant is still a guess,
    and a header naming a tensor twice was not written by a safetensors writer: refused."""
    path = _write(
        tmp_path / "dup.safetensors",
        f'{{"a": {_entry(0, 8)}, "b": {_entry(8, 16)}, "b": {_entry(8, 16)}}}',
        16,
    )
    with pytest.raises(CheckpointError, match="the key 'b' twice"):
        fastinfer.load_weights_(Pair(), path)


@pytest.mark.parametrize(
    ("header", "nbytes"),
    [
        (f'{{"__metadata__": null, "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}', 16),
        (f'{{"__metadata__": {{"format": "pt"}}, "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}', 16),
        (f'{{"z": {_entry(0, 0, [0])}, "a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}', 16),
        (f'{{"b": {_entry(8, 16)}, "a": {_entry(0, 8)}, "z": {_entry(16, 16, [0])}}}', 16),
        (f'{{"a": {_entry(0, 8)}, "b": {_entry(8, 16)}}}' + " " * 7, 16),  # writers pad with spaces
    ],
    ids=["metadata-null", "metadata-strings", "zero-size-first", "zero-size-last", "padded"],
)
def test_headers_the_safetensors_library_accepts_still_load(
    header: str, nbytes: int, tmp_path: Path
) -> None:
    path = _write(tmp_path / "ok.safetensors", header, nbytes)
    assert not _library_refuses(path)
    model = Pair()
    fastinfer.load_weights_(model, path, strict=False)
    assert model.a.tolist() == [0, 1] and model.b.tolist() == [2, 3]


def test_a_file_the_safetensors_library_writes_with_metadata_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0]), "e": torch.zeros(0)}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"format": "pt", "k": "v"})
    model = Pair()
    model.register_buffer("e", torch.empty(0))
    fastinfer.load_weights_(model, tmp_path / "m.safetensors")
    assert model.a.tolist() == [1, 2] and model.b.tolist() == [3, 4]


# --------------------------------------------------------------------------------------------
# device="meta": refused up front
# --------------------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    return fastinfer.save_weights(nn.Linear(4, 2), tmp_path / "lin.safetensors")


@pytest.mark.parametrize("device", ["meta", torch.device("meta")], ids=["str", "device"])
def test_load_model_refuses_meta_before_building(device: Any, tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    built: list[int] = []

    def factory() -> nn.Module:
        built.append(1)
        return nn.Linear(4, 2)

    with pytest.raises(ConfigError, match=r"meta device loads nothing.*empty_init\(\)") as info:
        fastinfer.load_model(factory, path, device=device)
    assert "not in the checkpoint" not in str(info.value)
    assert built == []  # refused up front


def test_load_weights_refuses_meta(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    with fastinfer.empty_init():
        model = nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="meta device loads nothing"):
        fastinfer.load_weights_(model, path, device="meta")
    fastinfer.load_weights_(model, path, device="cpu")  # the model is untouched and still loads
    assert not model.weight.is_meta


def test_load_pretrained_refuses_meta_up_front(tmp_path: Path) -> None:
    # Refused before the folder is looked at (this one does not even exist).
    with pytest.raises(ConfigError, match="meta device loads nothing"):
        fastinfer.load_pretrained(tmp_path / "nowhere", device="meta")


# --------------------------------------------------------------------------------------------
# load_pretrained with a damaged config.json
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastinfer import testing

    folder = tmp_path_factory.mktemp("bert") / "good"
    testing.hf_bert(
        hidden_size=32, num_hidden_layers=1, intermediate_size=64, vocab_size=50
    ).save_pretrained(folder)
    return folder


def _config(saved: Path) -> dict[str, Any]:
    return dict(json.loads((saved / "config.json").read_text()))


_BAD_CONFIGS: dict[str, tuple[Any, str]] = {
    "empty": (b"", r"is empty"),
    "blank": (b"  \n", r"is empty"),
    "truncated": (b'{"model_type": "bert", ', r"is not valid JSON \(.* at line 1 column"),
    "not-utf8": (b'{"model_type": "\xff"}', r"is not UTF-8 text"),
    "null": (b"null", r"holds JSON null, not an object of config fields"),
    "list": (b"[]", r"holds JSON array, not an object of config fields"),
    "number": (b"3", r"holds JSON number"),
    "unknown-model-type": (
        lambda c: {**c, "model_type": "nosuch"},
        r"does not give a model_type transformers .* knows .*nosuch",
    ),
    "no-model-type": (
        lambda c: {k: v for k, v in c.items() if k != "model_type"},
        r"does not give a model_type transformers .* knows",
    ),
    "bad-dtype": (lambda c: {**c, "dtype": "float7"}, r"records dtype='float7', which is not"),
    "bad-torch-dtype": (
        lambda c: {k: v for k, v in c.items() if k != "dtype"} | {"torch_dtype": "float7"},
        r"records torch_dtype='float7', which is not a torch dtype",
    ),
}


@pytest.mark.transformers
@pytest.mark.parametrize("case", list(_BAD_CONFIGS), ids=list(_BAD_CONFIGS))
def test_a_damaged_config_json_is_a_checkpoint_error(
    case: str, saved_bert: Path, tmp_path: Path
) -> None:
    content, match = _BAD_CONFIGS[case]
    folder = tmp_path / "cfg"  # a name no model type matches (transformers guesses from it)
    shutil.copytree(saved_bert, folder)
    raw = content if isinstance(content, bytes) else json.dumps(content(_config(saved_bert)))
    (folder / "config.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    with pytest.raises(CheckpointError, match=match) as info:
        fastinfer.load_pretrained(folder)
    msg = str(info.value)
    assert repr(str(folder / "config.json")) in msg and "fix:" in msg


@pytest.mark.transformers
def test_a_good_config_json_still_loads(saved_bert: Path) -> None:
    model = fastinfer.load_pretrained(saved_bert)
    assert type(model).__name__ == "BertModel"
