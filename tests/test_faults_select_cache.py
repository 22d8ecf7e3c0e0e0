"""select_backend's decision cache and the runtimes' artefact cache under faults: decision files
edited or written for another request, structurally wrong ones, folders that cannot be written,
damaged ONNX artefacts, and an empty example batch. Before, each was trusted (a winner that was
never a candidate), a raw TypeError / OSError / InvalidProtobuf, or a permanent failure."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import fastinfer
from fastinfer import testing
from fastinfer.compiling import _artifacts, _decisions, select_backend
from fastinfer.errors import CompileError, ConfigError

MODEL = testing.tiny_mlp()
X = torch.randn(8, 32)


def _select(cache_dir: Path, **kw: Any) -> fastinfer.compiling.BackendReport:
    return select_backend(
        MODEL,
        (X,),
        candidates=["eager", ("copy", lambda t: MODEL(t))],
        budget_seconds=None,
        repeat=1,
        cache_dir=cache_dir,
        **kw,
    )


def _record(cache_dir: Path) -> Path:
    (found,) = (cache_dir / "decisions").glob("*.json")
    return found


def _edited(doc: dict[str, Any], edit: str) -> Any:
    first = doc["results"][0]
    return {
        "winner-openvino": {**doc, "winner": "openvino"},
        "winner-inductor": {**doc, "winner": "inductor"},
        "wrong-key": {**doc, "key": "deadbeef"},
        "other-batch-sizes": {**doc, "batch_sizes": [1, 64]},
        "winner-failed": {
            **doc,
            "winner": "copy",
            "results": [first, {**doc["results"][1], "status": "failed"}],
        },
        "null": None,
        "list": [],
        "results-int": {**doc, "results": 5},
        "latency-null": {**doc, "results": [{**first, "latency_seconds": None}]},
        "speedup-string": {**doc, "results": [{**first, "speedup": {"1": "fast"}}]},
        "margin-missing": {k: v for k, v in doc.items() if k != "margin"},
    }[edit]


EDITED = ["winner-openvino", "winner-inductor", "wrong-key", "other-batch-sizes", "winner-failed"]
MALFORMED = ["null", "list", "results-int", "latency-null", "speedup-string", "margin-missing"]


@pytest.mark.parametrize("edit", EDITED + MALFORMED)
def test_a_decision_that_does_not_answer_the_request_is_measured_again(
    tmp_path: Path, edit: str, caplog: pytest.LogCaptureFixture
) -> None:
    _select(tmp_path)
    record = _record(tmp_path)
    record.write_text(json.dumps(_edited(json.loads(record.read_text()), edit)))
    with caplog.at_level(logging.WARNING, logger="fastinfer.compiling"):
        report = _select(tmp_path)
    assert not report.from_cache
    assert report.winner in ("eager", "copy") and report.batch_sizes == (1, 8)
    assert report.notes[0].startswith(f"ignoring the cached decision in {record}: ")
    assert report.notes[0].endswith(": measuring again")
    assert "ignoring the cached decision" in caplog.text
    again = _select(tmp_path)  # rewritten: the next call reuses it, without the note
    assert again.from_cache and again.winner == report.winner
    assert not any("ignoring" in n for n in again.notes)


def _blocked_folder(tmp_path: Path) -> Path:
    (tmp_path / "decisions").write_text("")  # a file where the folder goes
    return tmp_path


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile"


@pytest.mark.parametrize("where", ["decisions-is-a-file", "cache-dir-is-a-file", "EROFS", "ENOSPC"])
def test_a_decision_that_cannot_be_stored_leaves_the_selection_standing(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path
    if where == "decisions-is-a-file":
        cache_dir = _blocked_folder(tmp_path)
    elif where == "cache-dir-is-a-file":
        cache_dir = _a_file(tmp_path)
    else:
        code = getattr(errno, where)

        def refuse(target: Any, text: str) -> None:
            raise OSError(code, f"simulated {where}")

        monkeypatch.setattr(_decisions, "atomic_write_text", refuse)
    with caplog.at_level(logging.WARNING, logger="fastinfer.compiling"):
        report = _select(cache_dir)
    assert report.winner in ("eager", "copy") and report.result("copy").status == "ok"
    (note,) = [n for n in report.notes if "not stored" in n]
    assert note.startswith(f"the decision was not stored in {cache_dir / 'decisions'} (")
    assert "point cache_dir (FASTINFER_CACHE_DIR) at a writable folder" in note
    assert "the decision was not stored" in caplog.text


def test_an_empty_example_batch_is_refused_up_front(tmp_path: Path) -> None:
    ids = torch.zeros(0, 16, dtype=torch.long)
    with pytest.raises(
        ConfigError, match=r"empty batch \(example_inputs\['input_ids'\] has 0 rows"
    ):
        select_backend(
            MODEL,
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            candidates=["eager"],
            cache_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="empty batch"):
        select_backend(MODEL, (torch.zeros(0, 32),), candidates=["eager"], cache_dir=tmp_path)


# artefacts


def _builder(calls: list[int], payload: bytes = b"x" * 100) -> Any:
    def build(folder: Path) -> None:
        calls.append(1)
        (folder / "model.onnx").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(payload[::-1])

    return build


def _damage_it(folder: Path, how: str) -> None:
    manifest = folder / _artifacts.MANIFEST
    if how == "truncated":
        (folder / "model.onnx").write_bytes(b"x" * 10)
    elif how == "missing-file":
        (folder / "sub" / "weights.bin").unlink()
    elif how == "manifest-missing":
        manifest.unlink()
    elif how == "old-manifest":  # written before file sizes were recorded
        doc = json.loads(manifest.read_text())
        del doc["files"]
        manifest.write_text(json.dumps(doc))
    else:
        manifest.write_text({"manifest-null": "null", "manifest-list": "[]", "cut": "{"}[how])


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "missing-file",
        "manifest-missing",
        "old-manifest",
        "manifest-null",
        "manifest-list",
        "cut",
    ],
)
def test_a_damaged_artefact_is_rebuilt_once(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    folder, hit = _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls))
    assert not hit and calls == [1]
    assert _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls)) == (folder, True)
    _damage_it(folder, how)
    with caplog.at_level(logging.WARNING, logger="fastinfer.compiling"):
        again, hit = _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls))
    assert (again, hit) == (folder, False) and calls == [1, 1]
    assert f"rebuilding the onnx artefact in {folder}" in caplog.text
    assert (folder / "model.onnx").read_bytes() == b"x" * 100
    assert _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls)) == (folder, True)


def test_a_file_of_the_recorded_size_is_not_hashed_at_every_use(tmp_path: Path) -> None:
    # sizes are checked on every use, the sha256 only recorded: hashing a BERT-base export
    # (~0.4 GB) would add ~0.4 s to every start; a damaged file of the right size fails to load
    calls: list[int] = []
    folder, _ = _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls))
    (folder / "sub" / "weights.bin").write_bytes(b"y" * 100)  # same size, other bytes
    assert _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls)) == (folder, True)
    doc = json.loads((folder / _artifacts.MANIFEST).read_text())
    assert len(doc["files"]["sub/weights.bin"]["sha256"]) == 64


def test_a_damaged_artefact_that_cannot_be_replaced_raises_compile_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    folder, _ = _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls))
    _damage_it(folder, "truncated")
    monkeypatch.setattr(_artifacts.shutil, "rmtree", lambda *a, **k: None)  # cannot remove it
    with pytest.raises(CompileError, match=r"is damaged after rebuilding it \(it was damaged: "):
        _artifacts.artifact(tmp_path, "onnx", {"a": 1}, _builder(calls))


def test_an_artefact_that_cannot_be_written_raises_compile_error(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("")  # a file where the artefacts folder goes
    failed: dict[tuple[str, str], str] = {}
    with pytest.raises(CompileError, match=r"could not build the onnx artefact .*writable folder"):
        _artifacts.artifact(tmp_path / "blocked", "onnx", {"a": 1}, _builder([]), failed)
    with pytest.raises(CompileError, match="the same build failed for another candidate"):
        _artifacts.artifact(tmp_path / "blocked", "onnx", {"a": 1}, _builder([]), failed)


def test_a_truncated_onnx_runtime_graph_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    from fastinfer.compiling import build_backend

    model = torch.nn.Linear(16, 4).eval()
    x = torch.randn(8, 16)
    build_backend("onnxruntime", model, (x,), batch_sizes=(1, 8), cache_dir=tmp_path)
    (graph,) = (tmp_path / "artifacts").glob("onnxruntime-*/model.onnx")
    with open(graph, "r+b") as f:
        f.truncate(50)
    with caplog.at_level(logging.WARNING, logger="fastinfer.compiling"):
        rebuilt = build_backend("onnxruntime", model, (x,), batch_sizes=(1, 8), cache_dir=tmp_path)
    assert "rebuilding the onnxruntime artefact" in caplog.text and "cut short" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-4, atol=1e-5)
    (graph.parent / _artifacts.MANIFEST).write_text("null")
    report = select_backend(
        model,
        (x,),
        candidates=["eager", "onnxruntime"],
        budget_seconds=None,
        repeat=1,
        cache_dir=tmp_path,
    )
    assert report.result("onnxruntime").status == "ok", report.result("onnxruntime").reason
