"""ONNX Runtime and OpenVINO as select_backend candidates (optional extras, imported lazily).

Both start from one ONNX export of the model (:mod:`._onnx`), cached as an artefact
(:mod:`._artifacts`):

* ``onnxruntime`` (extra ``fastinfer[onnx]``): for Hugging Face BERT-family models the graph goes
  through ``onnxruntime.transformers.optimizer`` (fused ``Attention`` taking the raw 0/1 mask,
  ``EmbedLayerNormalization``, ``SkipLayerNormalization``, ``BiasGelu``; skipped with a note if it
  fails), then an ``InferenceSession`` on the CPU execution provider with all graph optimisations
  and torch's thread count.
* ``openvino`` (extra ``fastinfer[openvino]``): ``openvino.convert_model`` on the ONNX file,
  saved as IR (``model.xml`` + ``model.bin``, weights not compressed), compiled for the CPU with
  ``INFERENCE_PRECISION_HINT=f32`` for float32 models (OpenVINO otherwise runs bf16 on CPUs that
  have it, which is not what eager computes) and torch's thread count.

Each built runtime is checked like every candidate (against eager at every batch size, shared
tolerances) and, when the export made the sequence axis dynamic, once more at half the sequence
length, so a graph that baked the example's length in is rejected rather than served; with a 2-D
``attention_mask``, also on the example padded otherwise (rows on the other side, a masked token
inside a row), so a path that handles one padding layout only is rejected too. The callable
takes the tensors by name or positionally in ``forward``'s order, returns eager's output structure
(a transformers ``ModelOutput`` with ``.logits``, a dict, a tuple: :class:`OutputStructure`) and
refuses non-tensor arguments that differ from the ones baked in at export (:mod:`._runtime_args`).
Models the runtimes cannot run here (bfloat16; a graph whose ops the runtime has no kernel for at
the model's dtype, float64 GELU in ONNX Runtime) are refused when built, naming the dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer import _torch_compat
from fastinfer._common.keys import structure_key, weights_fingerprint
from fastinfer._common.manifest import environment_manifest
from fastinfer._common.padding import padding_layout, padding_variants, valid_mask
from fastinfer._optional import available, require
from fastinfer.compiling._artifacts import artifact
from fastinfer.compiling._build import BuildContext, Builder
from fastinfer.compiling._compile import CompiledModel, new_stats
from fastinfer.compiling._inputs import inputs_for, split
from fastinfer.compiling._onnx import (
    EXPORTER_VERSION,
    arg_names,
    bert_shape,
    dynamic_axes,
    export_onnx,
    named_tensors,
    positional_names,
)
from fastinfer.compiling._runtime_args import BakedArguments, as_graph_dtype
from fastinfer.compiling._verify import check_close, leaves, max_error
from fastinfer.errors import CompileError, VerificationError

__all__ = [
    "NOT_INSTALLED",
    "OnnxRuntimeBuilder",
    "OpenVinoBuilder",
    "OutputStructure",
    "RuntimeModel",
]

NOT_INSTALLED = "not installed (pip install 'fastinfer[{extra}]')"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


_CONSTANTS = (type(None), bool, int, float, str)


class OutputStructure:
    """Eager's output structure, given back to a runtime's flat output tensors: a model that
    returns a transformers ``ModelOutput`` (``.logits``), a dict or nested tuples returns the same
    from ONNX Runtime and OpenVINO, so code written against eager does not break when a runtime
    wins. Plain constants among the leaves (None, numbers, strings) are eager's; any other object
    (a KV cache built on the example, say) is not in the graph and comes back as None, never as
    the example's object."""

    def __init__(self, reference: Any) -> None:
        flat, self._spec = _torch_compat.tree_flatten(reference)
        self._slots = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        self._template: list[Any] = [x if isinstance(x, _CONSTANTS) else None for x in flat]
        # The exported graph's outputs are leaves() of eager's output: the same tensors, in order.
        self.usable = len(self._slots) == len(leaves(reference))

    def __call__(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        if not self.usable or len(tensors) != len(self._slots):
            return tensors[0] if len(tensors) == 1 else tensors
        flat = list(self._template)
        for slot, t in zip(self._slots, tensors):
            flat[slot] = t
        return _torch_compat.tree_unflatten(flat, self._spec)


class RuntimeModel:
    """A runtime session called like the model: tensors in (by the export's input names, or
    positionally in the order of the model's ``forward``), eager's output structure out.
    Thread-safe (one call at a time per session).

    ``dtypes``: the dtype each input was exported with (another is converted when nothing is
    lost, else refused); ``baked``: the non-tensor arguments the export fixed (a call that passes
    others is refused). Both raise :class:`CompileError` naming the argument and the fix."""

    def __init__(
        self,
        run: Callable[[dict[str, Any]], list[Any]],
        input_names: list[str],
        arg_names: list[str],
        structure: OutputStructure | None = None,
        exported: list[str] | None = None,
        *,
        dtypes: Mapping[str, torch.dtype] | None = None,
        baked: BakedArguments | None = None,
    ) -> None:
        self._run = run
        self._inputs = input_names
        self.arg_names = arg_names
        self._structure = structure
        self._exported = set(input_names) | set(exported or ())
        self._dtypes = dict(dtypes or {})
        self._baked = baked
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.arg_names):
            raise CompileError(
                f"the exported model takes at most {len(self.arg_names)} positional arguments "
                f"({', '.join(self.arg_names) or 'none'}), got {len(args)}; pass inputs by name"
            )
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        extra = [
            k for k, v in named.items() if isinstance(v, torch.Tensor) and k not in self._exported
        ]
        if extra:  # the graph would ignore them: eager would not
            raise CompileError(
                f"the exported model was built without the tensor input(s) {', '.join(map(repr, extra))}; "
                "include them in example_inputs when it is built (select_backend / build_backend) "
                "so that the graph takes them"
            )
        if self._baked is not None:
            self._baked.check(named, self._exported)
        feed = {}
        for n in self._inputs:
            t = named.get(n)
            if not isinstance(t, torch.Tensor):
                raise CompileError(
                    f"the exported model needs the tensor input {n!r} (it takes "
                    f"{', '.join(map(repr, self._inputs))}, by name or in forward's order)"
                )
            feed[n] = _array(n, as_graph_dtype(n, t, self._dtypes.get(n)))
        with self._lock:
            try:
                outs = self._run(feed)
            except Exception as exc:
                raise CompileError(_run_failure(feed, exc)) from exc
        tensors = tuple(torch.from_numpy(o) for o in outs)
        if self._structure is not None:
            return self._structure(tensors)
        return tensors[0] if len(tensors) == 1 else tensors


def _array(name: str, t: torch.Tensor) -> Any:
    try:
        return t.detach().cpu().contiguous().numpy()
    except TypeError as exc:  # bfloat16: numpy has no such dtype
        raise CompileError(
            f"the input {name!r} is {t.dtype}, which numpy (through which ONNX Runtime and "
            "OpenVINO take their inputs) cannot hold. Fix: serve the model in float32 with this "
            "candidate, or use eager / inductor for bfloat16"
        ) from exc


def _run_failure(feed: Mapping[str, Any], exc: Exception) -> str:
    """What a runtime's failure on a call means, with the fix."""
    shapes = ", ".join(f"{n}{tuple(v.shape)} {v.dtype}" for n, v in feed.items())
    text = f"the exported graph failed on {shapes}: {type(exc).__name__}: {str(exc)[:300]}."
    lowered = str(exc).lower()
    if "not_implemented" in lowered or "could not find an implementation" in lowered:
        return (
            f"{text} The runtime has no kernel for one of the graph's ops at these dtypes. Fix: "
            "serve the model in float32 with this candidate, or use eager / inductor"
        )
    if "data type" in lowered or "element type" in lowered:
        return (
            f"{text} The graph takes other dtypes. Fix: pass the inputs in the example's "
            "dtypes, or build the candidate with example_inputs of the dtypes you serve"
        )
    return (
        f"{text} The export may have fixed a size the example had (a Python int computed from a "
        "tensor's shape); leave this candidate out or serve the example's shapes"
    )


def _call_names(ctx: BuildContext, ex: _Export) -> list[str]:
    """Positional parameter names, in forward's order; ``input_<i>`` past them (``*args``)."""
    return arg_names(ctx.model, max(len(positional_names(ctx.model)), len(ex.args)))


def _structure(ctx: BuildContext) -> OutputStructure | None:
    """Eager's output structure from the builder's eager pass (None: flat tensors)."""
    return None if ctx.reference is None else OutputStructure(ctx.reference)


@dataclass(frozen=True)
class _Export:
    """The example as the export sees it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    named: list[tuple[str, torch.Tensor]]
    arg_names: list[str]
    seq_axis: bool

    @classmethod
    def of(cls, ctx: BuildContext) -> _Export:
        args, kwargs = inputs_for(ctx.example_inputs, max(ctx.sizes))
        named = named_tensors(ctx.model, args, kwargs)
        axes = dynamic_axes(named)
        return cls(
            args,
            kwargs,
            named,
            arg_names(ctx.model, len(args)),
            any(1 in ax for ax in axes.values()),
        )

    def runner(
        self, ctx: BuildContext, run: Callable[[dict[str, Any]], list[Any]], inputs: list[str]
    ) -> RuntimeModel:
        """A :class:`RuntimeModel` on ``run`` that checks calls against this export."""
        return RuntimeModel(
            run,
            inputs,
            _call_names(ctx, self),
            _structure(ctx),
            [n for n, _ in self.named],
            dtypes={n: t.dtype for n, t in self.named},
            baked=BakedArguments.of(ctx.model, self.args, self.kwargs, self.arg_names),
        )

    def spec(self) -> list[Any]:
        axes = dynamic_axes(self.named)
        return [[n, str(t.dtype), t.dim(), sorted(axes.get(n, {}))] for n, t in self.named]


def _environment() -> dict[str, Any]:
    # An exported graph does not depend on the thread count; everything else counts.
    env = environment_manifest(compiler=False)
    env.pop("threads", None)
    return env


def _onnx_file(ctx: BuildContext, ex: _Export, root: Path) -> tuple[Path, str, bool]:
    """The raw ONNX export of the model (cached): ``(file, exporter, from_cache)``."""
    model = ctx.model
    assert isinstance(model, nn.Module)
    key_doc = {
        "environment": _environment(),
        "model": structure_key(model),
        "weights": weights_fingerprint(model),
        "inputs": ex.spec(),
        "constants": [[k, repr(v)] for k, v in ex.kwargs.items() if not isinstance(v, torch.Tensor)]
        + [repr(a) for a in ex.args if not isinstance(a, torch.Tensor)],
        "exporter": EXPORTER_VERSION,
    }
    used: list[str] = []

    def build(folder: Path) -> None:
        used.append(export_onnx(model, ex.args, ex.kwargs, folder / "model.onnx"))

    folder, hit = artifact(root, "onnx", key_doc, build, ctx.failed)
    return folder / "model.onnx", (used[0] if used else "cached"), hit


def _check_other_length(ctx: BuildContext, ex: _Export, fn: Callable[..., Any]) -> None:
    """With a dynamic sequence axis: the runtime at half the example's length equals eager."""
    if not ex.seq_axis:
        return
    args, kwargs = inputs_for(ctx.example_inputs, min(ctx.sizes))
    names = {n for n, _ in ex.named}
    seq = int(dict(ex.named)["attention_mask"].shape[1])
    half = max(1, seq // 2)

    def cut(name: str, v: Any) -> Any:
        if name in names and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == seq:
            return v[:, :half].contiguous()
        return v

    args = tuple(cut(n, a) for n, a in zip(ex.arg_names, args))
    kwargs = {k: cut(k, v) for k, v in kwargs.items()}
    with torch.inference_mode():
        expected = ctx.model(*args, **kwargs)
        got = fn(*args, **kwargs)
    check_close(
        got, expected, rtol=ctx.rtol, atol=ctx.atol, where=f"sequence length {half} (dynamic axis)"
    )


def _check_other_padding(ctx: BuildContext, ex: _Export, fn: Callable[..., Any], name: str) -> None:
    """With a 2-D ``attention_mask``: the runtime equals eager, on valid positions, on the
    example laid out otherwise (its rows on the other padding side, a masked token inside a row:
    :func:`padding_variants`). A path that handles the example's padding layout only (a mask
    reduced to per-row lengths) raises :class:`VerificationError` saying so, rather than being
    served. A layout eager itself fails on is not checked."""
    args, kwargs = ex.args, ex.kwargs
    layout = padding_layout(valid_mask(ctx.model, args, kwargs))
    for label, named in padding_variants({**dict(zip(ex.arg_names, args)), **kwargs}):
        v_args = tuple(named[n] for n in ex.arg_names[: len(args)])
        v_kwargs = {k: named[k] for k in kwargs}
        try:
            with torch.inference_mode():
                expected = ctx.model(*v_args, **v_kwargs)
        except Exception:  # a layout the model itself refuses: nothing to compare with
            continue
        with torch.inference_mode():
            got = fn(*v_args, **v_kwargs)
        valid = valid_mask(ctx.model, v_args, v_kwargs)
        try:
            check_close(got, expected, rtol=ctx.rtol, atol=ctx.atol, where=label, valid=valid)
        except VerificationError:
            raise VerificationError(
                f"{name} handles the example's padding layout ({layout}) only: on the same batch "
                f"{label} it differs from eager on valid positions (max error "
                f"{max_error(got, expected, valid):.3g}), so it would answer wrongly on batches "
                "padded otherwise, and it is not served. Fix: use another candidate (eager, "
                "inductor, the other runtime)"
            ) from None


def _wrap(name: str, ctx: BuildContext, runner: RuntimeModel) -> CompiledModel:
    stats = new_stats(name, None, warmed_batch_sizes=ctx.sizes)
    return CompiledModel(ctx.model, runner, stats=stats, on_recompile="error", uses_dynamo=False)


def _dtypes(ctx: BuildContext) -> list[torch.dtype]:
    """The floating dtypes the model computes in (its parameters', the example's tensors')."""
    args, kwargs = split(ctx.example_inputs)
    found = [t.dtype for _, t in _params(ctx)]
    found += [v.dtype for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    return sorted({d for d in found if d.is_floating_point}, key=str)


def _refuse_bfloat16(ctx: BuildContext, what: str) -> None:
    if torch.bfloat16 in _dtypes(ctx):
        lacks = (
            "ONNX Runtime's CPU kernels lack (no bfloat16 Gemm, MatMul, Erf)"
            if what == "ONNX Runtime"
            else "numpy, through which OpenVINO takes its inputs and gives its outputs, lacks"
        )
        raise CompileError(
            f"{what} does not run bfloat16 models here: the model's parameters or example "
            f"inputs are torch.bfloat16, which {lacks}. Fix: serve the model in float32 with "
            "this candidate (model.float(), float32 inputs), or use eager / inductor, which run "
            "bfloat16"
        )


def _cannot_load(what: str, ctx: BuildContext, exc: Exception) -> CompileError:
    dtypes = ", ".join(map(str, _dtypes(ctx))) or "no floating dtype"
    return CompileError(
        f"{what} cannot load the exported graph on the CPU ({type(exc).__name__}: "
        f"{str(exc)[:300]}); the model computes in {dtypes}, and {what}'s CPU kernels cover "
        "float32 fully but other dtypes only in part (ONNX Runtime has no float64 Erf, say). "
        "Fix: serve the model in float32 with this candidate (model.float()), or use eager / "
        "inductor"
    )


def _runtime_skip(ctx: BuildContext, module: str, extra: str, what: str) -> str:
    if not available(module):
        return NOT_INSTALLED.format(extra=extra)
    if not isinstance(ctx.model, nn.Module):
        return f"{what} needs an nn.Module to export to ONNX"
    if ctx.on_gpu:
        return f"fastinfer runs {what} on the CPU; the inputs are on the GPU"
    args, kwargs = split(ctx.example_inputs)
    if not any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        return "no tensor inputs to export with"
    return ""


class OnnxRuntimeBuilder(Builder):
    """``onnxruntime``: the exported graph, with ORT's transformer fusions where they apply."""

    def skip(self, ctx: BuildContext) -> str:
        if not available("onnx"):
            return NOT_INSTALLED.format(extra="onnx")
        return _runtime_skip(ctx, "onnxruntime", "onnx", "ONNX Runtime")

    def estimate_seconds(self, ctx: BuildContext) -> float:
        return 3.0 + 0.1 * ctx.params_millions

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        ort = require("onnxruntime", purpose="the onnxruntime candidate of select_backend")
        _refuse_bfloat16(ctx, "ONNX Runtime")
        ex = _Export.of(ctx)
        root = (ctx.artifacts or ctx.tmp) / "artifacts"
        raw, exporter, _ = _onnx_file(ctx, ex, root)
        shape = bert_shape(ctx.model)
        notes: list[str] = []

        def optimise(folder: Path) -> None:
            target = folder / "model.onnx"
            if shape is not None:
                try:
                    from onnxruntime.transformers import optimizer

                    opt = optimizer.optimize_model(
                        str(raw),
                        model_type="bert",
                        num_heads=shape[0],
                        hidden_size=shape[1],
                        opt_level=0,
                        optimization_options=_fusion_options(),
                    )
                    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
                    opt.save_model_to_file(str(target))
                    (folder / "fusions.txt").write_text(
                        ", ".join(f"{k} x{v}" for k, v in sorted(fused.items()))
                    )
                    return
                except Exception as exc:  # fusions are optional: the plain graph still runs
                    (folder / "fusions.txt").write_text(
                        f"transformer fusions failed ({type(exc).__name__}: {str(exc)[:200]})"
                    )
            target.write_bytes(raw.read_bytes())

        key_doc = {
            "environment": _environment(),
            "onnx": raw.parent.name,
            "onnxruntime": _version("onnxruntime"),
            "fusions": list(shape) if shape else None,
        }
        if shape is not None:  # a graph fused with per-row lengths (before) is not reused
            key_doc["attention_mask"] = MASK_FORMAT
        folder, hit = artifact(root, "onnxruntime", key_doc, optimise)
        fusions = (folder / "fusions.txt").read_text() if (folder / "fusions.txt").is_file() else ""
        notes.append(f"fused: {fusions}" if fusions and "failed" not in fusions else fusions)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's idle threads otherwise spin for a while after each run, taking the cores from
        # whatever runs next (torch, another candidate being timed, the rest of the service).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A run that fails raises with ORT's message, which the candidate's report carries; its
        # logger would also print the same error to stderr, in colour, outside any log config.
        options.log_severity_level = 4  # fatal only
        try:
            session = ort.InferenceSession(
                str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # NOT_IMPLEMENTED: no kernel for an op at the model's dtype
            raise _cannot_load("ONNX Runtime", ctx, exc) from exc
        inputs = [i.name for i in session.get_inputs()]
        runner = ex.runner(ctx, lambda feed: session.run(None, feed), inputs)
        _check_other_length(ctx, ex, runner)
        _check_other_padding(ctx, ex, runner, "onnxruntime")
        ctx.notes.extend(
            n for n in [f"export: {exporter}", "cached artefact" if hit else "", *notes] if n
        )
        wrapped = _wrap("onnxruntime", ctx, runner)
        return wrapped, wrapped


class OpenVinoBuilder(Builder):
    """``openvino``: the exported ONNX graph converted to OpenVINO IR, compiled for the CPU."""

    def skip(self, ctx: BuildContext) -> str:
        return _runtime_skip(ctx, "openvino", "openvino", "OpenVINO")

    def estimate_seconds(self, ctx: BuildContext) -> float:
        return 3.0 + 0.1 * ctx.params_millions

    def build(self, ctx: BuildContext) -> tuple[Callable[..., Any], Any]:
        ov = require("openvino", purpose="the openvino candidate of select_backend")
        _refuse_bfloat16(ctx, "OpenVINO")
        ex = _Export.of(ctx)
        root = (ctx.artifacts or ctx.tmp) / "artifacts"
        raw, exporter, _ = _onnx_file(ctx, ex, root)

        def convert(folder: Path) -> None:
            model = ov.convert_model(str(raw))
            ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)

        key_doc = {
            "environment": _environment(),
            "onnx": raw.parent.name,
            "openvino": _version("openvino"),
        }
        folder, hit = artifact(root, "openvino", key_doc, convert)
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        if all(t.dtype != torch.bfloat16 and t.dtype != torch.float16 for _, t in _params(ctx)):
            config["INFERENCE_PRECISION_HINT"] = "f32"  # eager computes in float32
        try:
            compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU", config)
        except Exception as exc:
            raise _cannot_load("OpenVINO", ctx, exc) from exc
        request = compiled.create_infer_request()
        exported = [n for n, _ in ex.named]
        # A port can carry several tensor names (the ONNX input's and, after OpenVINO's own
        # passes, an internal one such as '/embeddings/Cast_output_0'): take the exported one.
        inputs = [
            next((n for n in exported if n in port.get_names()), port.get_any_name())
            for port in compiled.inputs
        ]
        count = len(compiled.outputs)

        def run(feed: Mapping[str, Any]) -> list[Any]:
            request.infer({i: feed[n] for i, n in enumerate(inputs)})  # by port: names may differ
            return [request.get_output_tensor(i).data.copy() for i in range(count)]

        runner = ex.runner(ctx, run, inputs)
        _check_other_length(ctx, ex, runner)
        _check_other_padding(ctx, ex, runner, "openvino")
        ctx.notes.extend(n for n in [f"export: {exporter}", "cached artefact" if hit else ""] if n)
        wrapped = _wrap("openvino", ctx, runner)
        return wrapped, wrapped


#: How ONNX Runtime's fused ``Attention`` takes the mask: the raw 0/1 mask
#: (``AttentionMaskFormat.AttentionMask``). The ``bert`` default, ``MaskIndexEnd``, reduces it to
#: per-row lengths, which assumes right padding: left-padded rows and a masked token inside a row
#: came out wrong (0.003-0.02 off on valid positions). Raw masks cost no measurable time here.
MASK_FORMAT = "raw"


def _fusion_options() -> Any:
    """``FusionOptions`` for the ``bert`` fusions, taking the attention mask as it is."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    options = FusionOptions("bert")
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    return options


def _params(ctx: BuildContext) -> list[tuple[str, torch.Tensor]]:
    model = ctx.model
    return list(model.named_parameters()) if isinstance(model, nn.Module) else []
