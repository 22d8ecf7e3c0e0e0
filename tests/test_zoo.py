"""The model zoo matrix: real architectures x fastinfer's primitives (issue 18).

Each architecture of :data:`fastinfer.testing.ZOO` is built from a tiny config with random weights
(one layer, hidden size 32, 12 tokens, 32x32 images) and run through every primitive as a user
would: ``load_pretrained`` / ``load_model`` round trips, ``swap_attention_``, ``compile_model``
under ``no_grad`` and ``inference_mode``, and the ``DynamicBatcher`` with padded dicts or stacked
images. ``SUPPORT`` below declares what each cell does (supported, supported with a declaration,
or declined and why); every test asserts that reality matches its cell, and the support table in
``docs/support.md`` is rendered from ``SUPPORT``, so the docs cannot drift from what is tested.

Regenerate the table after changing ``SUPPORT``: ``python tests/test_zoo.py``.

Cost: compiling is the slow part, so every architecture compiles with dynamo's ``eager`` backend
(the same tracing, guards, warm-up and recompile checks as inductor, without code generation) and
a representative subset (``INDUCTOR``) also with inductor. Rows that need torchvision skip, with
the reason, where torchvision cannot be imported (see docs/support.md).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import fastinfer
from fastinfer import testing
from fastinfer._common.tolerances import tolerance_for
from fastinfer.batching import PadCollate, StackCollate

ROOT = Path(__file__).resolve().parent.parent
SUPPORT_PAGE = ROOT / "docs" / "support.md"
PRIMITIVES = ("load", "swap", "compile", "batch", "runtime")
HEADERS = {
    "load": "`load_pretrained` / `load_model`",
    "swap": "`swap_attention_`",
    "compile": "`compile_model`",
    "batch": "`DynamicBatcher`",
    "runtime": "ONNX Runtime / OpenVINO (`select_backend`)",
}
BERT_PATHS = ("hf:packed", "hf:fused", "hf:sdpa", "hf:eager")
HF_PATHS = ("hf:sdpa", "hf:eager")
T5_DIMS = {"last_hidden_state": 1, "encoder_last_hidden_state": 1}
INDUCTOR = ("bert", "llama", "mixtral", "vit")  # also compiled with inductor (the slow part)
SIZES = (1, 2, 4)


@dataclass(frozen=True)
class Cell:
    """What one primitive does on one architecture.

    ``status``: "supported", "declared" (supported once the user declares something: ``detail``
    says what) or "declined" (``detail`` is the reason the primitive gives, asserted).
    """

    status: str
    detail: str = ""
    paths: tuple[str, ...] = ()  # swap: the paths verified on this architecture
    tied: bool = False  # load: the model has tied weights
    converted: str = ""  # load: what transformers' conversion does to the saved keys
    batch_sizes: tuple[int, ...] = SIZES  # compile
    batch_dim: str = "dynamic"  # compile
    sequence_dims: Any = "auto"  # batch


def _text(paths: tuple[str, ...], *, tied: bool = False, converted: str = "") -> dict[str, Cell]:
    return {
        "load": Cell("supported", tied=tied, converted=converted),
        "swap": Cell("supported", paths=paths),
        "compile": Cell("supported"),
        "batch": Cell("supported"),
        "runtime": Cell("supported"),
    }


_NO_ATTENTION = "no attention path to swap"

SUPPORT: dict[str, dict[str, Cell]] = {
    "bert": _text(BERT_PATHS),
    "roberta": _text(BERT_PATHS),
    "distilbert": _text(BERT_PATHS),
    "xlm-roberta": _text(BERT_PATHS),
    "deberta-v2": {**_text(("hf:eager",))},
    "modernbert": _text(HF_PATHS),
    "vit": _text(HF_PATHS, converted="attention and MLP keys renamed"),
    "clip-text": _text(HF_PATHS),
    "clip-vision": _text(HF_PATHS),
    "whisper": _text(HF_PATHS),
    "t5": {
        **_text(HF_PATHS, tied=True),
        "batch": Cell(
            "declared",
            "the decoder's outputs run along the decoder's tokens, not the padded inputs: "
            "`PadCollate(sequence_dims=...)` names the sequence dims "
            "(auto declines, showing how)",
            sequence_dims=T5_DIMS,
        ),
    },
    "gpt2": _text(HF_PATHS, tied=True),
    "llama": _text(HF_PATHS),
    "qwen2": _text(HF_PATHS),
    "mixtral": {
        **_text(HF_PATHS, converted="per-expert weights fused into `gate_up_proj`"),
        "runtime": Cell(
            "declined",
            "ONNX export fails (TorchScript: `aten::histc` has no ONNX op; dynamo: "
            "`torch.export` fails on the expert routing): a `CompileError` row, the other "
            "candidates still run",
        ),
    },
    "resnet50": {
        "load": Cell("supported"),
        "swap": Cell("declined", _NO_ATTENTION),
        "compile": Cell("supported"),
        "batch": Cell("supported"),
        "runtime": Cell("supported"),
    },
    "vit-b-16": {
        "load": Cell("supported"),
        "swap": Cell("supported", paths=("torch:fastpath",)),
        "compile": Cell("supported"),
        "batch": Cell("supported"),
        "runtime": Cell("supported"),
    },
    "mobilenet-v3": {
        "load": Cell("supported"),
        "swap": Cell("declined", _NO_ATTENTION),
        "compile": Cell(
            "supported",
            "the model specialises the batch dimension (`16 <= batch`): one graph per warmed size",
            batch_sizes=(1, 8, 32),
            batch_dim="static",
        ),
        "batch": Cell("supported"),
        "runtime": Cell("supported"),
    },
}
CELLS = [(arch, prim) for arch in SUPPORT for prim in PRIMITIVES]


def _entry(arch: str) -> testing.ZooModel:
    entry = testing.zoo_model(arch)
    why = entry.available()
    if why:
        pytest.skip(why)
    return entry


def _call(model: Any, inputs: Any, **kwargs: Any) -> Any:
    return model(**inputs, **kwargs) if isinstance(inputs, dict) else model(inputs, **kwargs)


def _close(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    if valid is not None and got.dim() >= 2 and got.shape[:2] == valid.shape:
        got, want = got[valid], want[valid]
    rtol, atol = tolerance_for(want.dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _valid(inputs: Any) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return None if mask is None else mask.bool()


def _equal_state(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Bit for bit; a tensor transformers keeps in float32 (``_keep_in_fp32_modules``) may hold
    the same values in a wider dtype."""
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    keep = set(getattr(loaded, "_keep_in_fp32_modules", None) or ())
    for key in a:
        if a[key].dtype == b[key].dtype:
            assert torch.equal(a[key], b[key]), key
        else:
            assert set(key.split(".")) & keep, f"{key}: {a[key].dtype} became {b[key].dtype}"
            assert torch.equal(a[key].double(), b[key].double()), key


def _tie_groups(model: torch.nn.Module) -> set[frozenset[str]]:
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return {frozenset(names) for names in by_id.values() if len(names) > 1}


# --------------------------------------------------------------------------------------------
# load_pretrained / load_model
# --------------------------------------------------------------------------------------------


def _load_round_trip(
    entry: testing.ZooModel,
    original: torch.nn.Module,
    folder: Path,
    reports: list[Any] | None = None,
) -> Any:
    on_report = None if reports is None else reports.append
    if entry.requires == "torchvision":
        path = folder.with_suffix(".safetensors")
        fastinfer.save_weights(original, path)
        dtype = next(original.parameters()).dtype  # the model is built in float32
        return fastinfer.load_model(entry.make, path, dtype=dtype, on_report=on_report)
    original.save_pretrained(folder)  # transformers' default format (safetensors, saved names)
    return fastinfer.load_pretrained(folder, on_report=on_report)


@pytest.mark.parametrize("arch", list(SUPPORT))
def test_load(arch: str, tmp_path: Path) -> None:
    entry, cell = _entry(arch), SUPPORT[arch]["load"]
    original = entry.build()
    reports: list[fastinfer.LoadReport] = []
    loaded = _load_round_trip(entry, original, tmp_path / "default", reports)
    _equal_state(original, loaded)
    notes = " ".join(n for r in reports for n in r.notes)
    assert ("transformers' checkpoint conversion" in notes) is bool(cell.converted), notes
    if entry.make_full is not None:  # this model is one part of a saved model: load it from that
        whole = entry.build_full()
        whole.save_pretrained(tmp_path / "whole")
        part = fastinfer.load_pretrained(tmp_path / "whole", model_class=type(original))
        _equal_state(original, part)
    assert (_tie_groups(loaded) != set()) is cell.tied
    assert _tie_groups(loaded) == _tie_groups(original)
    inputs = entry.inputs(2)
    with torch.inference_mode():
        assert torch.equal(entry.call(loaded, inputs), entry.call(original, inputs))
    if entry.requires == "torchvision":
        sharded = testing.save_checkpoint(original, tmp_path / "sharded", shards=3)
        _equal_state(original, fastinfer.load_model(entry.make, sharded))
    else:
        original.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
        _equal_state(original, fastinfer.load_pretrained(tmp_path / "sharded"))
    for dtype in (torch.float16, torch.bfloat16):
        half = entry.build().to(dtype)
        loaded_half = _load_round_trip(entry, half, tmp_path / str(dtype))
        _equal_state(half, loaded_half)


# --------------------------------------------------------------------------------------------
# swap_attention_
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(SUPPORT))
def test_swap(arch: str) -> None:
    entry, cell = _entry(arch), SUPPORT[arch]["swap"]
    model = entry.build()
    inputs = entry.inputs(4)
    with torch.inference_mode():
        want = entry.call(model, inputs)
    example = inputs if isinstance(inputs, dict) else (inputs,)
    report = fastinfer.swap_attention_(model, example_inputs=example, repeat=1)
    rejected = [(p.name, p.reason) for p in report.paths if p.verified is False]
    assert not rejected, f"a path computes something else: {rejected}"
    verified = {p.name for p in report.paths if p.name != "original" and p.verified}
    assert verified == set(cell.paths), report
    if report.chosen == "original":
        assert report.reason, "a report that declines gives its reason"
    if cell.status == "declined":
        assert report.chosen == "original" and cell.detail in report.reason
    with torch.inference_mode():
        _close(entry.call(model, inputs), want, _valid(inputs))
    buf = io.BytesIO()
    torch.save(model, buf)  # the swapped model stays savable and copyable
    copy.deepcopy(model)
    if report.chosen != "original":
        fastinfer.undo_attention_swap_(model)


# --------------------------------------------------------------------------------------------
# compile_model
# --------------------------------------------------------------------------------------------


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compile_and_serve(arch: str, backend: str, cache: Any = None) -> fastinfer.CompiledModel:
    entry, cell = _entry(arch), SUPPORT[arch]["compile"]
    model = entry.build()
    compiled = fastinfer.compile_model(
        model, entry.inputs(4), backend=backend, batch_sizes=cell.batch_sizes, cache=cache
    )
    s = compiled.statistics()
    assert s.batch_dim == cell.batch_dim and s.fallback is None
    if cell.detail:
        assert "specialises the batch dimension" in s.batch_dim_reason
    before = _graphs()
    for b in cell.batch_sizes:
        inputs = entry.inputs(b, seed=b)
        with torch.inference_mode():
            want = entry.call(model, inputs)
            _close(entry.call(compiled, inputs), want)  # inputs made outside inference_mode
            _close(entry.call(compiled, entry.inputs(b, seed=b)), want)  # ... and inside
        with torch.no_grad():
            _close(entry.call(compiled, inputs), want)
    assert _graphs() == before, "a warmed batch size compiled again"
    assert compiled.statistics().recompiles_refused == 0
    return compiled


@pytest.mark.parametrize("arch", list(SUPPORT))
def test_compile(arch: str) -> None:
    _compile_and_serve(arch, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("arch", INDUCTOR)
def test_compile_inductor(arch: str, tmp_path: Path) -> None:
    with fastinfer.InductorCache(tmp_path) as cache:
        compiled = _compile_and_serve(arch, "inductor", cache)
    assert compiled.statistics().backend == "inductor"


# --------------------------------------------------------------------------------------------
# DynamicBatcher
# --------------------------------------------------------------------------------------------


def _serve(fn: Any, collate: Any, items: list[Any]) -> list[Any]:
    async def main() -> list[Any]:
        async with fastinfer.DynamicBatcher(
            fn, max_batch_size=8, max_wait_ms=50, collate=collate
        ) as b:
            return await asyncio.gather(*(b.submit(it) for it in items))

    return asyncio.run(main())


@pytest.mark.parametrize("arch", list(SUPPORT))
def test_batch(arch: str) -> None:
    entry, cell = _entry(arch), SUPPORT[arch]["batch"]
    model = entry.build()
    items: list[Any] = entry.items(5)
    if entry.kind != "text" and entry.requires == "transformers":
        key = {"image": "pixel_values", "audio": "input_features"}[entry.kind]
        items = [{key: it} for it in items]
    params = inspect.signature(model.forward).parameters
    options = {"use_cache": False} if "use_cache" in params else {}  # a cache cannot be split

    def fn(batch: Any) -> Any:
        with torch.inference_mode():
            return _call(model, batch, **options)

    if entry.kind != "text":
        results = _serve(fn, StackCollate(), items)
    else:
        if cell.status == "declared":
            with pytest.raises(fastinfer.BatchError, match=r"PadCollate\(sequence_dims="):
                _serve(fn, PadCollate(), items[:2])
        results = _serve(fn, PadCollate(sequence_dims=cell.sequence_dims), items)
    for item, got in zip(items, results):
        one = {k: v[None] for k, v in item.items()} if isinstance(item, dict) else item[None]
        with torch.inference_mode():
            alone = testing.ZooModel.main_output(_call(model, one, **options))[0]
        main = testing.ZooModel.main_output(got)
        assert main.shape == alone.shape  # the item's own length, not the batch's
        _close(main, alone)


# --------------------------------------------------------------------------------------------
# ONNX Runtime / OpenVINO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(SUPPORT))
def test_runtime(arch: str, tmp_path: Path) -> None:
    entry, cell = _entry(arch), SUPPORT[arch]["runtime"]
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    pytest.importorskip("openvino", reason="needs the openvino extra")
    from fastinfer.compiling import build_backend

    model = entry.build()
    example, other = entry.inputs(4), entry.inputs(3)
    for runtime in ("onnxruntime", "openvino"):
        if cell.status == "declined":
            with pytest.raises(fastinfer.CompileError, match="aten::histc"):
                build_backend(runtime, model, example, batch_sizes=(1, 4), cache_dir=tmp_path)
            continue
        served = build_backend(runtime, model, example, batch_sizes=(1, 4), cache_dir=tmp_path)
        with torch.inference_mode():
            got, want = _call(served, other), _call(model, other)
            assert type(got) is type(want), runtime
            _close(entry.call(served, other), entry.call(model, other))
        # A decoder's KV cache is not in the graph: None, never the example's cache object.
        assert getattr(got, "past_key_values", None) is None
    if cell.status != "declined":  # one export, shared by both runtimes
        assert len(list((tmp_path / "artifacts").glob("onnx-*"))) == 1


# --------------------------------------------------------------------------------------------
# The support table in the docs
# --------------------------------------------------------------------------------------------


def _cell_text(arch: str, prim: str) -> str:
    cell = SUPPORT[arch][prim]
    entry = testing.zoo_model(arch)
    if cell.status == "declined":
        return f"declined: {cell.detail}"
    if prim == "load":
        how = "`load_model`" if entry.requires == "torchvision" else "`save_pretrained` folder"
        text = f"yes: {how}, sharded, fp16, bf16"
        if cell.converted:
            text += f"; saved keys converted as `from_pretrained` does ({cell.converted})"
        if cell.tied:
            text += "; tied weights stay tied"
        if entry.full_name:
            text += f"; also from a whole `{entry.full_name}` folder (`model_class=`)"
        return text
    if prim == "swap":
        return "yes: " + ", ".join(f"`{p}`" for p in cell.paths)
    if prim == "compile":
        graphs = cell.detail or "one dynamic graph for 2..max"
        text = f"yes: sizes {', '.join(map(str, cell.batch_sizes))}; {graphs}"
        return text + ("; also with inductor" if arch in INDUCTOR else "")
    if prim == "runtime":
        return "yes: both, eager's output type, other batch sizes" + (
            " and lengths" if entry.kind == "text" else ""
        )
    if cell.status == "declared":
        return f"with a declaration: {cell.detail}"
    if entry.kind == "text":
        return "yes: padded token dicts, outputs cut per item (auto)"
    return "yes: stacked " + ("audio features" if entry.kind == "audio" else "images")


def render_support() -> str:
    head = "| architecture | " + " | ".join(HEADERS[p] for p in PRIMITIVES) + " |"
    rule = "|---" * (len(PRIMITIVES) + 1) + "|"
    rows = [
        f"| {testing.zoo_model(a).label} | "
        + " | ".join(_cell_text(a, p) for p in PRIMITIVES)
        + " |"
        for a in SUPPORT
    ]
    return "\n".join(
        [
            "# Support matrix",
            "",
            "<!-- Generated by `python tests/test_zoo.py` from SUPPORT in tests/test_zoo.py; "
            "do not edit by hand. -->",
            "",
            "What each primitive does on the architectures people serve. Every cell is a test in "
            "`tests/test_zoo.py`: each architecture is built from a tiny config with random "
            "weights (`fastinfer.testing.ZOO`: one layer, hidden size 32, 12 tokens, 32x32 "
            "images; nothing is downloaded) and run through the primitive as a service would; "
            "the test asserts that the primitive does what the cell says, and this page is "
            "rendered from the same declarations, so it cannot drift from what is tested.",
            "",
            "- **load**: `save_pretrained` (transformers' default format, with the key names "
            "the hub uses) read back by `fastinfer.load_pretrained`, equal to the original bit "
            "for bit, also sharded and in fp16/bf16; torchvision models through "
            "`fastinfer.load_model`.",
            "- **swap**: `swap_attention_` with a padded example batch: the paths listed are "
            "verified against the original within the shared tolerances "
            "(`fastinfer._common.tolerances`); the one kept is the fastest on the machine (or "
            "the original, with `report.reason` saying why). `hf:<impl>` paths are "
            "transformers' own attention implementations (the one a model already uses is its "
            "original path; for BERT-family encoders it also zeroes padded positions). A "
            "swapped model stays picklable, deep-copyable and savable with `torch.save`.",
            "- **compile**: `compile_model` warmed at the batch sizes listed, then called at each "
            "under `torch.no_grad()` and `torch.inference_mode()` (inputs made inside and "
            "outside it) with no recompile. Every row compiles with dynamo's `eager` backend "
            "(the same tracing, guards and recompile checks, without code generation); the rows "
            "marked *also with inductor* compile with inductor too (a representative subset: "
            "compiling is the slow part of the matrix).",
            "- **runtime**: the `onnxruntime` and `openvino` candidates of `select_backend`, "
            "built for batch sizes 1 and 4 (`build_backend`: one ONNX export shared by both, "
            "checked against eager, at half the length where the sequence axis is dynamic), "
            "then called like the model on a batch of 3: the same output type as eager (a "
            "`ModelOutput` stays one) and the main output within the tolerances. A model that "
            "cannot be exported is declined with the exporters' reasons.",
            "- **DynamicBatcher**: concurrent single requests batched (`collate=PadCollate()` "
            "for token dicts, `StackCollate()` for images and audio features); every caller "
            "gets what the model gives its request alone (same shape, values within the "
            "tolerances).",
            "",
            head,
            rule,
            *rows,
            "",
            "Cells read: *yes* (supported as described), *with a declaration* (supported once "
            "the user declares what the primitive cannot know; without it the primitive raises "
            "an error that shows how), *declined* (the primitive refuses, with this reason). "
            "Nothing in the matrix crashes or returns a wrong result.",
            "",
            "The torchvision rows run where torchvision imports. PyPI's torchvision 0.28 (the "
            "release for torch 2.13) is linked against CUDA builds of torch and fails to import "
            "beside the CPU build (`operator torchvision::nms does not exist`), so CI, which has "
            "the CPU build, skips these rows with the reason; they were checked with the "
            "pure-Python model definitions of an older torchvision (0.15.2, whose missing "
            "compiled ops these models do not use).",
            "",
            "Beyond this matrix, `tests/test_zoo_wide.py` checks 24 more architectures (ALBERT, "
            "ELECTRA, CamemBERT, MPNet, DeBERTa, RoFormer, Megatron-BERT, Data2Vec-text; "
            "Mistral, Phi-3, Gemma 2, Falcon, BLOOM, OPT, GPT-NeoX, GPT-J, XGLM, OpenAI GPT; "
            "BART, Marian, M2M-100; DeiT, BEiT, DINOv2) for what users run first: "
            "`swap_attention_` under `inference_mode` answers like the original on valid "
            "positions, and `load_pretrained` of a bf16 folder gives every tensor the dtype and "
            "value `from_pretrained` gives it. An outside probe of 95 architectures (not in the "
            "suite: it takes an hour) found the bugs that list now guards.",
            "",
        ]
    )


def test_support_table_is_current() -> None:
    assert SUPPORT_PAGE.read_text() == render_support(), (
        "docs/support.md is out of date: run `python tests/test_zoo.py`"
    )


if __name__ == "__main__":
    SUPPORT_PAGE.write_text(render_support())
    print(f"wrote {SUPPORT_PAGE}", file=sys.stderr)
