"""Collation: many items -> one model input, and one model output -> many results.

A collator has two methods: ``collate(items) -> (batch, ctx)`` builds the model input and
``split(output, ctx, n) -> list`` cuts the output back into ``n`` per-item results. The batcher calls
``fn(batch)`` between the two. :class:`StackCollate` stacks equal shapes; :class:`PadCollate` pads
variable-length sequences (bare tensors, lists of token ids, or tokenizer dicts).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

from fastinfer.batching._unpad import AUTO, SequenceDims, Unpad, check_sequence_dims, split_padded
from fastinfer.errors import BatchError, ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("fastinfer.batching")

# torch and numpy are imported only when a batch is collated (``import fastinfer`` stays light;
# ``import torch`` alone pulls in torch.hub and tqdm). Type checks look them up in sys.modules:
# an object cannot be a tensor unless torch was imported.


def _torch() -> Any:
    import torch

    return torch


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_array(x: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def is_tensor_or_array(x: Any) -> bool:
    """A tensor or a numpy array: what :func:`split_output` splits along dim 0."""
    return _is_tensor(x) or _is_array(x)


__all__ = [
    "Collator",
    "PadCollate",
    "PaddedBatch",
    "StackCollate",
    "default_length",
    "split_output",
]


@runtime_checkable
class Collator(Protocol):
    """What ``DynamicBatcher(collate=...)`` accepts besides ``"stack"`` and ``"pad"``."""

    def collate(self, items: Sequence[Any]) -> tuple[Any, Any]: ...

    def split(self, output: Any, ctx: Any, n: int) -> list[Any]: ...


class PaddedBatch(NamedTuple):
    """What ``fn`` receives from :class:`PadCollate` when the items are bare tensors or id lists.

    ``data`` is ``(B, T, ...)``; ``attention_mask`` is ``(B, T)`` long (1 = real, 0 = padding) and
    ``lengths`` is ``(B,)`` long, each ``None`` unless asked for.
    """

    data: torch.Tensor
    attention_mask: torch.Tensor | None
    lengths: torch.Tensor | None


def _shape(x: Any) -> tuple[int, ...] | None:
    return tuple(x.shape) if _is_tensor(x) or _is_array(x) else None


def split_output(output: Any, n: int, *, where: str = "") -> list[Any]:
    """Split a batched output into ``n`` per-item results.

    A ``list`` is taken as one result per item; a tensor or array is split along dim 0; a mapping
    (a dict, a Hugging Face ``ModelOutput``) or a tuple is split element-wise, giving each item a
    dict or tuple of its own slices. (A padded batch's outputs are split by :class:`PadCollate`,
    which also cuts each item's sequence dims back to its length.)
    """
    if isinstance(output, list):
        if len(output) != n:
            raise BatchError(
                f"fn returned {len(output)} results {where}for a batch of {n} items; "
                "it must return exactly one result per item, in order"
            )
        return output
    if _is_tensor(output) or _is_array(output):
        if output.ndim == 0 or output.shape[0] != n:
            raise BatchError(
                f"fn returned {where}with shape {tuple(output.shape)} for a batch of {n} items; "
                f"its first dimension must be the batch ({n})"
            )
        return list(output)  # views (tensor) or rows (ndarray), no copies
    if isinstance(output, Mapping):
        parts = {k: split_output(v, n, where=f"{where}[{k!r}] ") for k, v in output.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(output, tuple):
        cols = [split_output(v, n, where=f"{where}[{j}] ") for j, v in enumerate(output)]
        return [tuple(c[i] for c in cols) for i in range(n)]
    raise BatchError(
        f"cannot split fn's output of type {type(output).__name__} {where}into {n} results; "
        "return a list with one result per item, a tensor/array with the batch on dim 0, "
        "or a dict/tuple of those"
    )


def _as_tensor(item: Any, index: int, where: str = "") -> torch.Tensor:
    """``item`` (``items[index]``, or its value at ``where``, e.g. ``"['input_ids']"``) as a tensor."""
    if _is_tensor(item):
        return item
    torch = _torch()
    if _is_array(item):
        return _from_numpy(item, f"item {index}{where}")
    if isinstance(item, list | tuple) and all(isinstance(v, int | float) for v in item):
        return torch.tensor(item)
    raise BatchError(
        f"item {index}{where} is a {type(item).__name__}; the built-in collators take tensors, "
        "arrays, lists of numbers, or dicts of those (pass collate=None to receive the raw list)"
    )


def _from_numpy(a: Any, what: str) -> torch.Tensor:
    np = sys.modules["numpy"]
    if a.dtype.kind not in "biufc":  # str, bytes, object, datetime...: torch has no such dtype
        raise BatchError(
            f"{what} is a numpy array of dtype {a.dtype}; the built-in collators take numeric "
            "arrays (bool, int, float, complex): convert it (e.g. tokenize strings first), or "
            "pass collate=None to receive the raw list"
        )
    if any(s < 0 for s in a.strides) or not a.dtype.isnative:  # np.flip, a[::-1], big-endian
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    try:
        return _torch().from_numpy(a)
    except (TypeError, ValueError) as e:  # a numeric dtype torch lacks (np.longdouble)
        raise BatchError(
            f"{what} is a numpy array of dtype {a.dtype}, which torch cannot hold ({e}); "
            "convert it (a.astype(np.float64)) before submitting"
        ) from e


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype every item fits in (type promotion, as ``torch.stack`` does). Empty items do not
    vote: ``[]`` becomes a float tensor, which must not turn every other item's ids to floats."""
    voters = [t for t in tensors if t.numel() > 0] or list(tensors)
    return functools.reduce(_torch().promote_types, (t.dtype for t in voters))


def _check_keys(items: Sequence[Any]) -> list[str]:
    """The keys every dict item shares (item 0's order); a :class:`BatchError` naming the item and
    the keys that differ otherwise."""
    keys = list(items[0])
    for i, it in enumerate(items):
        if not isinstance(it, Mapping):
            raise BatchError(
                f"item {i} is a {type(it).__name__}, item 0 is a dict with keys {keys}; the items "
                "of a batch must all be dicts with the same keys, or all be tensors/arrays/lists"
            )
        if set(it) != set(keys):
            missing = [k for k in keys if k not in it]
            extra = [k for k in it if k not in keys]
            diff = ", ".join(
                f"{verb} {ks}" for verb, ks in (("lacks", missing), ("adds", extra)) if ks
            )
            raise BatchError(
                f"item {i} has keys {list(it)}, item 0 has {keys} (item {i} {diff}); dict items "
                "must share keys: give every request the same keys (e.g. tokenize every text "
                "with the same options)"
            )
    return keys


class StackCollate:
    """Stack equal-shape items along a new dim 0 (tensors, arrays, numbers, or dicts of them).

    Outputs are split along dim 0 (see :func:`split_output`).
    """

    def collate(self, items: Sequence[Any]) -> tuple[Any, None]:
        return self._stack(items, ""), None

    def _stack(self, items: Sequence[Any], key: str) -> Any:
        first = items[0]
        if isinstance(first, Mapping):
            keys = _check_keys(items)
            return {k: self._stack([it[k] for it in items], f"{key}[{k!r}]") for k in keys}
        if isinstance(first, int | float) and not isinstance(first, bool):
            return _torch().tensor(list(items))
        tensors = [_as_tensor(it, i, key) for i, it in enumerate(items)]
        shapes = {i: tuple(t.shape) for i, t in enumerate(tensors)}
        if len(set(shapes.values())) > 1:
            odd = {i: s for i, s in shapes.items() if s != shapes[0]}
            raise BatchError(
                f"cannot stack items{key} of different shapes: item 0 is {shapes[0]}, "
                f"but {dict(list(odd.items())[:5])}; use collate='pad' for variable-length inputs"
            )
        return _torch().stack(tensors)

    def split(self, output: Any, ctx: Any, n: int) -> list[Any]:
        return split_output(output, n)


_LEAD_KEYS = ("input_ids", "attention_mask")


def _has_batch_dim(item: Mapping[str, Any]) -> bool:
    """Whether a dict item is a tokenizer's ``return_tensors="pt"`` output for one text: its
    ``input_ids`` (else ``attention_mask``) is ``(1, T)``. Then every value has a leading batch
    dim. Without either key a leading 1 is never dropped: in ``{"inputs_embeds": (1, D)}`` it is
    the sequence length of a one-token item, and nothing tells it from a batch dim."""
    for k in _LEAD_KEYS:
        if k in item:
            shape = _shape(item[k])
            return shape is not None and len(shape) == 2 and shape[0] == 1
    return False


def _seq(x: Any, index: int, key: str | None, batched: bool = False) -> torch.Tensor:
    t = _as_tensor(x, index, "" if key is None else f"[{key!r}]")
    if batched and t.ndim >= 2 and t.shape[0] == 1:  # the tokenizer's batch dim
        t = t[0]
    if t.ndim == 0:
        raise BatchError(
            f"item {index}{'' if key is None else f'[{key!r}]'} is a scalar; PadCollate pads sequences"
        )
    return t


# A tokenizer's values that run along the tokens, one per token. Other keys (``length`` from
# ``return_length=True``, an id the caller added) are padded like sequences, as they always were.
_PER_TOKEN = frozenset(
    {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "special_tokens_mask",
        "offset_mapping",
        "inputs_embeds",
    }
)


def _check_lengths(
    per_key: Mapping[str, list[torch.Tensor]], lead: str, lengths: list[int]
) -> None:
    """A tokenizer's per-token values of a dict item run along the same tokens as its ``lead``
    value: one that is shorter would be padded as if its tokens were real (a mask of 4 beside 5
    input_ids hides a real token), one that is longer would not fit."""
    if lead not in _PER_TOKEN:
        return
    for key, seqs in per_key.items():
        if key not in _PER_TOKEN:
            continue
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            if s.shape[0] != n:
                raise BatchError(
                    f"item {i}[{key!r}] has {s.shape[0]} positions but its {lead!r} has {n}; "
                    "a tokenizer's per-token values run along the same tokens. Fix: build the "
                    "item's values together (one tokenizer call), or collate it yourself"
                )


@dataclass(frozen=True)
class PadCollate:
    """Pad variable-length sequences to the longest in the batch; cut outputs back per item.

    Items are tensors ``(T, ...)``, lists of numbers (token ids) or dicts of those (a tokenizer's
    output for one text: when its ``input_ids``, else ``attention_mask``, is ``(1, T)``, the leading
    batch dim of every value is dropped). Bare items give ``fn`` a
    :class:`PaddedBatch`; dict items give a dict of ``(B, T)`` tensors with ``attention_mask``
    added when missing (and ``lengths`` when ``return_lengths``), ready for ``model(**batch)``.

    Each caller gets what calling the model on its item alone gives: outputs are split along the
    batch and cut back to the item's length along their *declared* sequence dimensions
    (``sequence_dims``), never by comparing sizes.

    Args:
        pad_value: the fill value, or a dict per key (``attention_mask`` is always padded with 0).
        side: ``"right"`` (the default: correct for every model) or ``"left"`` (decoder-only
            generation; see ``add_position_ids``).
        return_mask: give an attention mask (1 = real token).
        return_lengths: give each item's length.
        unpad_outputs: cut outputs back to each item's length (the default); ``False`` returns
            every output padded to the batch's width, as ``fn`` produced it.
        sequence_dims: which output dims run along the padded sequence: ``"auto"`` (Hugging Face
            output types by their fields; 1-D outputs have none; anything else raises
            :class:`BatchError` showing how to declare it), ``None`` (no output has one), a dim
            or tuple of dims for every output, or a mapping per output name or tuple position
            (``{"last_hidden_state": 1, "pooler_output": None}``).
        pad_to_multiple_of: round the padded length up (fewer distinct shapes for compiled models).
        add_position_ids: with ``side="left"``, ``True`` gives dict items ``position_ids``
            computed from the attention mask (real tokens count from 0; padding gets 1, as
            Hugging Face's ``generate`` does) unless they carry their own. Models with absolute
            positions (GPT-2, BERT) need them: otherwise a left-padded item's tokens sit at
            shifted positions and its outputs differ from the item run alone. Not the default
            (``None``: not added, and a warning says so once), because a model whose forward,
            compiled graph or exported graph takes no ``position_ids`` would then fail;
            ``False`` leaves them out without the warning. Right padding needs none.

    Items of one batch are promoted to a common dtype (an int8 item beside an int64 one gives
    int64; an empty item does not vote). Dict items must share keys (:class:`BatchError`).
    """

    pad_value: float | Mapping[str, float] = 0
    side: Literal["right", "left"] = "right"
    return_mask: bool = True
    return_lengths: bool = False
    unpad_outputs: bool = True
    pad_to_multiple_of: int | None = None
    sequence_dims: SequenceDims = AUTO
    add_position_ids: bool | None = None

    def __post_init__(self) -> None:
        if self.side not in ("right", "left"):
            raise ConfigError(f"PadCollate side must be 'right' or 'left', got {self.side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(
                f"pad_to_multiple_of must be a positive int, got {self.pad_to_multiple_of!r}"
            )
        check_sequence_dims(self.sequence_dims)

    def _pad_value(self, key: str | None) -> float:
        if key == "attention_mask":
            return 0
        if isinstance(self.pad_value, Mapping):
            return self.pad_value.get(key or "", 0) if key is not None else 0
        return self.pad_value

    def _pad(self, seqs: list[torch.Tensor], width: int, key: str | None) -> torch.Tensor:
        torch = _torch()
        first = seqs[0]
        for i, s in enumerate(seqs):
            if s.shape[1:] != first.shape[1:]:
                where = "" if key is None else f"[{key!r}]"
                hint = ""
                if s.ndim == 2 and s.shape[0] == first.shape[0] == 1:
                    hint = (
                        "; a leading 1 is dropped as a tokenizer's batch dim only in dict items "
                        "whose input_ids (or attention_mask) is (1, T): submit (T, ...) values"
                    )
                raise BatchError(
                    f"item {i}{where} has shape {tuple(s.shape)} but item 0 has {tuple(first.shape)}; "
                    f"only the first (sequence) dimension may differ{hint}"
                )
        out = torch.full(
            (len(seqs), width, *first.shape[1:]), self._pad_value(key), dtype=_result_dtype(seqs)
        )  # (B, T, ...)
        for i, s in enumerate(seqs):
            if self.side == "right":
                out[i, : s.shape[0]] = s
            else:
                out[i, width - s.shape[0] :] = s
        return out

    def _mask(self, lengths: list[int], width: int) -> torch.Tensor:
        torch = _torch()
        pos = torch.arange(width)[None, :]
        lens = torch.tensor(lengths)[:, None]
        mask = pos < lens if self.side == "right" else pos >= width - lens
        return mask.long()  # (B, T)

    def _width(self, lengths: list[int]) -> int:
        width = max(lengths)
        m = self.pad_to_multiple_of
        return width if m is None else -(-width // m) * m

    def collate(self, items: Sequence[Any]) -> tuple[Any, Unpad]:
        if isinstance(items[0], Mapping):
            keys = _check_keys(items)
            batched = [_has_batch_dim(it) for it in items]
            per_key = {
                k: [_seq(it[k], i, k, batched[i]) for i, it in enumerate(items)] for k in keys
            }
            lead = "input_ids" if "input_ids" in per_key else keys[0]
            lengths = [int(s.shape[0]) for s in per_key[lead]]
            _check_lengths(per_key, lead, lengths)
            width = self._width(lengths)
            batch: dict[str, torch.Tensor] = {k: self._pad(v, width, k) for k, v in per_key.items()}
            if self.return_mask and "attention_mask" not in batch:
                batch["attention_mask"] = self._mask(lengths, width)
            if self.side == "left" and "position_ids" not in batch and not self.add_position_ids:
                if self.add_position_ids is None and not self.__dict__.get("_warned"):
                    self.__dict__["_warned"] = True
                    logger.warning(
                        "PadCollate(side='left') pads token dicts on the left without "
                        "position_ids: a model with absolute positions (GPT-2, BERT) then sees "
                        "each item's tokens shifted by its padding and answers differently from "
                        "the item alone. Pass add_position_ids=True if its forward takes "
                        "position_ids, add_position_ids=False to keep them out (RoPE models, "
                        "or this warning off), or pad on the right"
                    )
            elif self.side == "left" and self.add_position_ids and "position_ids" not in batch:
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = self._mask(lengths, width)
                # Absolute-position models (GPT-2, BERT) would see each left-padded item's tokens
                # shifted by its padding; count real tokens instead, 1 at padding (HF's generate).
                pos = mask.long().cumsum(-1) - 1  # (B, T)
                batch["position_ids"] = pos.masked_fill(mask == 0, 1)
            if self.return_lengths:
                batch["lengths"] = _torch().tensor(lengths)
            return batch, Unpad(lengths, width, self.side)
        seqs = [_seq(it, i, None) for i, it in enumerate(items)]
        lengths = [int(s.shape[0]) for s in seqs]
        width = self._width(lengths)
        padded = PaddedBatch(
            self._pad(seqs, width, None),
            self._mask(lengths, width) if self.return_mask else None,
            _torch().tensor(lengths) if self.return_lengths else None,
        )
        return padded, Unpad(lengths, width, self.side)

    def split(self, output: Any, ctx: Unpad, n: int) -> list[Any]:
        if not self.unpad_outputs:
            return split_output(output, n)
        return split_padded(output, n, ctx, self.sequence_dims)


def default_length(item: Any) -> int:
    """An item's sequence length, for length bucketing: dim 0 of a tensor, ``len()`` of a list,
    ``input_ids`` of a tokenizer dict (a leading ``(1, T)`` batch dim is skipped, as
    :class:`PadCollate` drops it), words of a string."""
    if isinstance(item, Mapping):
        if not item:
            return 0
        value = item["input_ids"] if "input_ids" in item else next(iter(item.values()))
        shape = _shape(value)
        if shape is not None and len(shape) >= 2 and shape[0] == 1 and _has_batch_dim(item):
            return shape[1]
        return default_length(value)
    shape = _shape(item)
    if shape is not None:
        return shape[0] if shape else 1
    if isinstance(item, str):
        return len(item.split())
    if isinstance(item, Sequence):
        return len(item)
    raise ConfigError(
        f"cannot tell the length of a {type(item).__name__} item for bucketing; pass length_fn="
    )


def make_collator(collate: Any) -> Collator | None:
    if collate is None:
        return None
    if collate == "stack":
        return StackCollate()
    if collate == "pad":
        return PadCollate()
    if isinstance(collate, Collator):
        return collate
    raise ConfigError(
        f"collate must be None, 'stack', 'pad' or an object with collate(items) and "
        f"split(output, ctx, n) methods (e.g. PadCollate(...)), got {collate!r}"
    )
