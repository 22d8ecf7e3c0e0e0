"""Cutting a padded batch's outputs back to each item's own length, from a declaration.

Which output dimensions run along the padded sequence is *declared*, never guessed from sizes
(a pooled ``(B, 128)`` embedding in a 128-token batch looks exactly like a per-token output):

* ``sequence_dims="auto"`` (the default) knows the output types of Hugging Face models by their
  fields: ``last_hidden_state`` / ``hidden_states`` run along dim 1, ``attentions`` along dims 2 and
  3, ``pooler_output`` has none, ``logits`` run along dim 1 for token-level heads
  (``TokenClassifierOutput``, ``MaskedLMOutput``, ``CausalLMOutput...``) and have none for
  sequence-level ones (``SequenceClassifierOutput``...). A plain dict gets the same field rules
  (not ``logits``), plus sentence-transformers' ``token_embeddings`` / ``sentence_embedding`` and
  echoed inputs. A 1-D output ``(B,)`` has none. Anything else raises :class:`BatchError` showing
  how to declare it.
* ``None``: no output has a sequence dimension; ``1`` or ``(2, 3)``: every tensor output has them;
  a mapping per output name (dict or ``ModelOutput`` key) or position (tuple index), whose values
  are any of those (a value applies to every tensor under that output, e.g. each hidden state).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastinfer.errors import BatchError, ConfigError

__all__ = ["AUTO", "SequenceDims", "Unpad", "check_sequence_dims", "split_padded"]

AUTO = "auto"
SequenceDims = str | int | tuple[int, ...] | None | Mapping[str | int, Any]

# Hugging Face ModelOutput fields -> their sequence dims (for text models called on padded tokens).
_FIELDS: dict[str, tuple[int, ...]] = {
    "last_hidden_state": (1,),
    "hidden_states": (1,),
    "attentions": (2, 3),
    "pooler_output": (),
    "start_logits": (1,),
    "end_logits": (1,),
    "encoder_last_hidden_state": (1,),
    "encoder_hidden_states": (1,),
    "encoder_attentions": (2, 3),
    # sentence-transformers' features dict: the inputs come back with the embeddings
    "token_embeddings": (1,),
    "sentence_embedding": (),
    "input_ids": (1,),
    "attention_mask": (1,),
    "token_type_ids": (1,),
}
_TOKEN_HEADS = ("TokenClassifier", "MaskedLM", "CausalLM")
_SEQUENCE_HEADS = ("SequenceClassifier", "MultipleChoice", "ImageClassifier")
_DECODER_SIDE = ("Seq2Seq",)  # decoder fields index decoder tokens, not the padded inputs


@dataclass(frozen=True)
class Unpad:
    """Each item's length, the padded width and the padding side of one collated batch."""

    lengths: Sequence[int]
    width: int
    side: str


def check_sequence_dims(value: Any, where: str = "sequence_dims") -> None:
    """Validate a declaration when the collator is built (``ConfigError`` otherwise)."""
    if value is None or value == AUTO:
        return
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be 'auto', None, a dim, dims or a mapping; got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: dim {value} is not a sequence dim (dim 0 is the batch)")
        return
    if isinstance(value, tuple):
        for v in value:
            check_sequence_dims(v, where)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise ConfigError(f"{where}: keys are output names or positions, got {k!r}")
            check_sequence_dims(v, f"{where}[{k!r}]")
        return
    raise ConfigError(
        f"{where} must be 'auto', None, an int dim, a tuple of dims, or a mapping of output "
        f"name/position to those; got {value!r}"
    )


def _is_model_output(x: Any) -> bool:
    return any(c.__name__ == "ModelOutput" for c in type(x).__mro__)


def _auto(owner: Any, field: str | None) -> tuple[int, ...] | None:
    """The dims the output type tells, or None when it does not."""
    if not isinstance(owner, Mapping) or field is None:
        return None
    if not _is_model_output(owner):  # a plain dict: only the conventional names
        return _FIELDS.get(field)
    cls = type(owner).__name__
    if cls.startswith(_DECODER_SIDE) and not field.startswith("encoder_"):
        return None
    if field == "logits":
        if any(h in cls for h in _TOKEN_HEADS):
            return (1,)
        if any(h in cls for h in _SEQUENCE_HEADS):
            return ()
        return None
    return _FIELDS.get(field)


def _how(where: str, shape: tuple[int, ...], key: str | int | None) -> str:
    example = f"{{{key!r}: 1}}" if key is not None else "1"
    return (
        f"PadCollate cannot tell whether fn's output{where} (shape {shape}) has a sequence "
        "dimension to cut back to each item's length, and it does not guess from sizes. Declare "
        f"it: PadCollate(sequence_dims={example}) if the padded sequence runs along dim 1, "
        f"{{{(key if key is not None else 'name or position')!r}: None}} per output if it has "
        "none (pooled embeddings, class logits), or sequence_dims=None for all outputs; "
        "unpad_outputs=False returns every output padded as the batch was"
    )


def _is_array(x: Any) -> bool:
    torch = sys.modules.get("torch")
    np = sys.modules.get("numpy")
    return (torch is not None and isinstance(x, torch.Tensor)) or (
        np is not None and isinstance(x, np.ndarray)
    )


def _cut(out: Any, n: int, dims: tuple[int, ...], ctx: Unpad, where: str) -> list[Any]:
    shape = tuple(out.shape)
    if out.ndim == 0 or shape[0] != n:
        raise BatchError(
            f"fn returned {where}with shape {shape} for a batch of {n} items; "
            f"its first dimension must be the batch ({n})"
        )
    for d in dims:
        if d >= out.ndim or shape[d] != ctx.width:
            got = "has no such dim" if d >= out.ndim else f"has size {shape[d]}"
            raise BatchError(
                f"fn's output {where}(shape {shape}) was declared to run along the padded "
                f"sequence in dim {d}, but that dim {got}, not the padded length {ctx.width}; "
                "fix PadCollate(sequence_dims=...)"
            )
    if not dims:
        return list(out)  # views (tensor) or rows (ndarray), no copies
    rows = []
    for i, length in enumerate(ctx.lengths):
        start = 0 if ctx.side == "right" else ctx.width - length
        index: list[Any] = [i] + [slice(None)] * (out.ndim - 1)
        for d in dims:
            index[d] = slice(start, start + length)
        rows.append(out[tuple(index)])
    return rows


def split_padded(
    output: Any,
    n: int,
    ctx: Unpad,
    declared: SequenceDims,
    *,
    where: str = "",
    owner: Any = None,
    field: str | None = None,
    key: str | int | None = None,
) -> list[Any]:
    """Split ``output`` into ``n`` per-item results, each cut to its item's length along the
    declared sequence dims (see the module docstring)."""
    if isinstance(output, list):
        if len(output) != n:
            raise BatchError(
                f"fn returned {len(output)} results {where}for a batch of {n} items; "
                "it must return exactly one result per item, in order"
            )
        return output
    if _is_array(output):
        if declared is None:
            dims: tuple[int, ...] | None = ()
        elif isinstance(declared, int):
            dims = (declared,)
        elif isinstance(declared, tuple):
            dims = declared
        elif output.ndim <= 1:
            dims = ()
        else:
            dims = _auto(owner, field)
        if dims is None:
            raise BatchError(_how(where and f" {where.strip()}", tuple(output.shape), key))
        return _cut(output, n, dims, ctx, where)
    if isinstance(output, Mapping):
        parts = {}
        for k, v in output.items():
            sub = declared.get(k, AUTO) if isinstance(declared, Mapping) else declared
            parts[k] = split_padded(
                v, n, ctx, sub, where=f"{where}[{k!r}] ", owner=output, field=str(k), key=k
            )
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(output, tuple):
        cols = []
        sub_key: str | int | None
        for j, v in enumerate(output):
            if isinstance(declared, Mapping):
                sub, sub_key, sub_owner, sub_field = declared.get(j, AUTO), j, None, None
            else:  # the elements of one field (each hidden state) share its declaration
                sub, sub_key, sub_owner, sub_field = declared, key, owner, field
            cols.append(
                split_padded(
                    v,
                    n,
                    ctx,
                    sub,
                    where=f"{where}[{j}] ",
                    owner=sub_owner,
                    field=sub_field,
                    key=sub_key,
                )
            )
        return [tuple(c[i] for c in cols) for i in range(n)]
    hint = ""
    if field == "past_key_values":
        hint = " (a cache: call the model with use_cache=False)"
    raise BatchError(
        f"cannot split fn's output of type {type(output).__name__} {where}into {n} results{hint}; "
        "return a list with one result per item, a tensor/array with the batch on dim 0, "
        "or a dict/tuple of those"
    )
