"""Exporting a model to ONNX for the runtime candidates (ONNX Runtime, OpenVINO).

The model is wrapped so that the exported graph takes the example's tensors (by name) and returns
its output tensors flattened in the order :func:`._verify.leaves` reads them, so a runtime's
outputs compare with eager's one to one. Non-tensor arguments are baked into the graph.

* Dynamic axes: dim 0 (the batch) of every tensor input; dim 1 (the sequence) of every tensor
  whose dim 1 matches a 2-D ``attention_mask`` input's length.
* Exporter: torch's TorchScript-based exporter (``dynamo=False``) first, because ONNX Runtime's
  transformer optimizer recognises the attention subgraphs it writes (fused ``Attention``,
  ``EmbedLayerNormalization``, ``SkipLayerNormalization``, ``BiasGelu``); the dynamo exporter
  (``dynamo=True``, needs ``onnxscript``) if that fails. For Hugging Face BERT-family models the
  export runs with ``attn_implementation="eager"`` (restored afterwards): that subgraph is the one
  the optimizer fuses into a single ``Attention`` op.
* Data-dependent control flow: where the model turns a tensor computed from its inputs' values
  into a Python value while the TorchScript exporter traces it (``if x.sum() > 0:``), the graph
  would always take the example's branch; that export counts as failed (:mod:`._trace_values`),
  and the dynamo exporter, which refuses such code rather than baking it in, is tried instead.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfer import _torch_compat
from fastinfer.compiling._trace_values import mark_inputs, watch_values
from fastinfer.compiling._verify import leaves
from fastinfer.errors import CompileError

__all__ = [
    "EXPORTER_VERSION",
    "BertShape",
    "TensorsOnly",
    "arg_names",
    "bert_shape",
    "dynamic_axes",
    "export_onnx",
    "named_tensors",
    "positional_names",
]

#: Bumped when the export recipe changes (part of the artefact key).
EXPORTER_VERSION = 2  # 2: exports with data-dependent control flow are refused
_OPSET = 17
_BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")

BertShape = tuple[int, int]  # (num_heads, hidden_size)


def positional_names(model: Any) -> list[str]:
    """The names of ``model``'s (or its ``forward``'s) positional parameters, in order."""
    try:
        params = list(
            inspect.signature(
                model.forward if hasattr(model, "forward") else model
            ).parameters.values()
        )
    except (TypeError, ValueError):
        params = []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def arg_names(model: Any, n: int) -> list[str]:
    names = positional_names(model)
    return [names[i] if i < len(names) else f"input_{i}" for i in range(n)]


def named_tensors(
    model: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    """The example's tensors with the names the graph gives them (forward's parameter names)."""
    names = arg_names(model, len(args))
    out = [(n, a) for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
    out += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return out


def dynamic_axes(named: list[tuple[str, torch.Tensor]]) -> dict[str, dict[int, str]]:
    mask = dict(named).get("attention_mask")
    seq = int(mask.shape[1]) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    axes: dict[str, dict[int, str]] = {}
    for name, t in named:
        if t.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if seq is not None and t.dim() >= 2 and t.shape[1] == seq:
            axes[name][1] = "sequence"
    return axes


class TensorsOnly(nn.Module):
    """``model`` called with the example's tensors positionally, returning a flat tuple of tensors."""

    def __init__(self, model: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self._args = [None if isinstance(a, torch.Tensor) else a for a in args]
        self._arg_slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self._kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        self._kw_slots = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mark_inputs(tensors)  # what "computed from the inputs' values" starts from
        args = list(self._args)
        for slot, t in zip(self._arg_slots, tensors):
            args[slot] = t
        kw = dict(self._kwargs)
        kw.update(zip(self._kw_slots, tensors[len(self._arg_slots) :]))
        return tuple(leaves(self.model(*args, **kw)))


def bert_shape(model: Any) -> BertShape | None:
    """``(num_heads, hidden_size)`` of a Hugging Face BERT-family model (ORT can fuse it)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _BERT_FAMILY:
        return None
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)
    return (int(heads), int(hidden)) if heads and hidden else None


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """HF models: attn_implementation="eager" for the export (its subgraph is the one ONNX Runtime
    fuses), restored afterwards."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    switch = bert_shape(model) is not None and old not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)


def _plain(exc: BaseException) -> str:
    """An exporter's message without terminal colour codes, cut to its start."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))[:300]


def export_onnx(
    model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], path: Path
) -> str:
    """Write ``model`` (called as ``model(*args, **kwargs)``) to ``path``; returns the exporter used."""
    named = named_tensors(model, args, kwargs)
    if not named:
        raise CompileError("ONNX export needs at least one tensor input")
    wrapper = TensorsOnly(model, args, kwargs).eval()
    tensors = tuple(t for _, t in named)
    names = [n for n, _ in named]
    axes = dynamic_axes(named)
    errors = []
    branches: list[str] = []
    # The MHA / TransformerEncoderLayer fastpath (taken under no_grad) calls fused ops that no
    # exporter handles; the plain path computes the same.
    with _eager_attention(model), _torch_compat.mha_fastpath_disabled(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated and chatty
        try:
            with torch.no_grad(), watch_values() as branches:
                torch.onnx.export(
                    wrapper,
                    tensors,
                    str(path),
                    input_names=names,
                    dynamic_axes=axes,  # type: ignore[arg-type]
                    opset_version=_OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                    verbose=False,  # else a failure prints the whole TorchScript graph
                )
            if branches:
                raise CompileError(_data_dependent(branches))
            return "torchscript"
        except Exception as exc:
            errors.append(f"TorchScript exporter: {type(exc).__name__}: {_plain(exc)}")
        try:
            from torch.export import Dim

            shapes = {n: {d: Dim.AUTO for d in ax} for n, ax in axes.items()}
            program = torch.onnx.export(
                wrapper,
                tensors,
                input_names=names,
                dynamic_shapes=tuple(shapes.get(n, {}) for n in names),
                dynamo=True,
                external_data=False,
                verbose=False,  # no progress lines on stdout
            )
            assert program is not None
            program.save(str(path), external_data=False)
            return "dynamo"
        except Exception as exc:
            errors.append(f"dynamo exporter: {type(exc).__name__}: {_plain(exc)}")
    fix = (
        "write the branch with tensor ops (torch.where) or torch.cond so that the graph keeps "
        "both sides, or serve this model eagerly or with another candidate (inductor)"
        if branches
        else "make the model exportable (torch.onnx.export)"
    )
    raise CompileError(
        f"exporting {type(model).__name__} to ONNX failed with both exporters: "
        + "; ".join(errors)
        + f". Fix: {fix}, or leave the ONNX candidates out"
    )


def _data_dependent(places: list[str]) -> str:
    first = list(dict.fromkeys(places))[:3]
    return (
        "data-dependent control flow: the model turns a tensor computed from its inputs' "
        f"values into a Python value at {'; '.join(first)} (a TracerWarning), "
        "so the traced graph would always do what the example did and answer other inputs "
        "wrongly"
    )
