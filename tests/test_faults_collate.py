"""PadCollate and StackCollate under bad or unusual items (an outside tester's findings): mixed
dtypes, dict items with different keys, a one-token ``(1, D)`` feature, left padding on
absolute-position models, and numpy arrays torch cannot take as they are."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import numpy as np
import pytest
import torch

from fastinfer import BatchError, DynamicBatcher
from fastinfer import testing as ft
from fastinfer.batching import PadCollate, StackCollate
from fastinfer.batching._collate import default_length


def _serve(fn: Any, collate: Any, items: list[Any]) -> tuple[list[Any], DynamicBatcher]:
    """Submit ``items`` concurrently; the batch seals when all have arrived (``full``)."""

    async def main() -> tuple[list[Any], DynamicBatcher]:
        b = DynamicBatcher(fn, max_batch_size=len(items), max_wait_ms=10_000, collate=collate)
        async with b:
            out = await asyncio.gather(*(b.submit(it) for it in items))
        return out, b

    return asyncio.run(main())


# ----------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("items", "dtype", "want"),
    [
        (
            [torch.tensor([5, 6], dtype=torch.int8), torch.tensor([7, 300, 9])],
            torch.int64,
            [[5, 6, 0], [7, 300, 9]],
        ),
        ([torch.tensor([1, 2]), torch.tensor([0.5, 2.75])], torch.float32, [[1, 2], [0.5, 2.75]]),
        (
            [torch.tensor([1.0], dtype=torch.float16), torch.tensor([1.0001, 2.0])],
            torch.float32,
            [[1.0, 0.0], [1.0001, 2.0]],
        ),
        ([[], [1]], torch.int64, [[0], [1]]),
        ([[1, 2], [3.5]], torch.float32, [[1, 2], [3.5, 0]]),
    ],
    ids=["int8-then-300", "int-then-float", "fp16-then-fp32", "empty-list-no-vote", "lists"],
)
def test_pad_promotes_items_to_a_common_dtype(items: Any, dtype: torch.dtype, want: Any) -> None:
    data = PadCollate().collate(items)[0].data
    assert data.dtype == dtype
    torch.testing.assert_close(data, torch.tensor(want, dtype=dtype))


def test_pad_promotes_dict_values_like_stack() -> None:
    items = [
        {"input_ids": torch.tensor([5, 6]), "w": torch.tensor([1, 2])},
        {"input_ids": torch.tensor([7, 8, 9]), "w": torch.tensor([0.5, 2.75, 3.25])},
    ]
    w = PadCollate().collate(items)[0]["w"]
    assert w.tolist() == [[1.0, 2.0, 0.0], [0.5, 2.75, 3.25]]
    stacked = StackCollate().collate([it["w"][:2] for it in items])[0]
    assert w.dtype == stacked.dtype == torch.float32


# ------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("collate", [PadCollate(), StackCollate()], ids=["pad", "stack"])
def test_dict_items_with_different_keys_are_refused(collate: Any) -> None:
    short = {"input_ids": torch.tensor([5, 6, 7])}
    full = {"input_ids": torch.tensor([9, 10, 11]), "token_type_ids": torch.tensor([1, 1, 1])}
    with pytest.raises(BatchError, match=r"item 1 .*adds \['token_type_ids'\].*must share keys"):
        collate.collate([short, full])
    with pytest.raises(BatchError, match=r"item 1 .*lacks \['token_type_ids'\].*must share keys"):
        collate.collate([full, short])
    with pytest.raises(BatchError, match=r"item 1 is a Tensor, item 0 is a dict"):
        collate.collate([short, torch.tensor([1, 2, 3])])
    # the same keys in another order are the same request shape
    batch = collate.collate([full, dict(reversed(list(full.items())))])[0]
    assert list(batch)[:2] == ["input_ids", "token_type_ids"]


@pytest.mark.transformers
@pytest.mark.parametrize("order", ["extra-later", "missing-later"])
def test_requests_with_different_keys_each_resolve_once_with_their_own_keys(order: str) -> None:
    model = ft.zoo_model("bert").build()
    items: list[dict[str, torch.Tensor]] = [
        {"input_ids": torch.tensor([5, 6, 7, 8])},
        {"input_ids": torch.tensor([9, 10, 11]), "token_type_ids": torch.tensor([1, 1, 1])},
    ]
    if order == "missing-later":
        items.reverse()
    calls: list[int] = []

    def fn(batch: dict[str, torch.Tensor]) -> Any:
        calls.append(len(batch["input_ids"]))
        with torch.inference_mode():
            return model(**batch)

    out, b = _serve(fn, PadCollate(), items)
    assert sorted(calls) == [1, 1]  # the refused batch was bisected: each request ran alone
    stats = b.statistics()
    assert (stats.requests_ok, stats.requests_failed) == (2, 0)
    for item, got in zip(items, out):
        with torch.inference_mode():
            alone = model(**{k: v[None] for k, v in item.items()}).last_hidden_state[0]
        torch.testing.assert_close(got["last_hidden_state"], alone)  # token_type_ids honoured


# ---------------------------------------------------------------------------- leading dim 1


def test_a_one_token_feature_keeps_its_sequence_dim() -> None:
    pad, d = PadCollate(), 4
    batch = pad.collate([{"inputs_embeds": torch.ones(1, d)}, {"inputs_embeds": torch.ones(1, d)}])[
        0
    ]
    assert batch["inputs_embeds"].shape == (2, 1, d) and batch["attention_mask"].shape == (2, 1)
    batch = pad.collate([{"inputs_embeds": torch.ones(3, d)}, {"inputs_embeds": torch.ones(1, d)}])[
        0
    ]
    assert batch["inputs_embeds"].shape == (2, 3, d)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    items = [
        {"input_ids": torch.tensor([7]), "feat": torch.ones(1, d)},
        {"input_ids": torch.tensor([8, 9]), "feat": torch.ones(2, d)},
    ]
    assert pad.collate(items)[0]["feat"].shape == (2, 2, d)
    assert [default_length(it) for it in items] == [1, 2]
    assert default_length({"inputs_embeds": torch.ones(1, d)}) == 1


def test_a_tokenizers_batch_dim_is_still_dropped() -> None:
    items = [
        {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]])},
        {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1]])},
    ]
    batch = PadCollate().collate(items)[0]
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert [default_length(it) for it in items] == [2, 3]
    # one text tokenized as (1, T), the other as a plain list: both unbatched
    mixed = PadCollate().collate([items[0], {"input_ids": [7], "attention_mask": [1]}])[0]
    assert mixed["input_ids"].tolist() == [[5, 6], [7, 0]]


# ------------------------------------------------------------------------------ left padding


@pytest.mark.transformers
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_left_padding_gives_each_caller_its_output_alone(arch: str) -> None:
    entry = ft.zoo_model(arch)
    model = entry.build()
    items = entry.items(4)  # lengths 12, 9, 4, ...
    options = (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )
    seen: list[dict[str, torch.Tensor]] = []

    def fn(batch: dict[str, torch.Tensor]) -> Any:
        seen.append(batch)
        with torch.inference_mode():
            return model(**batch, **options)

    out, _ = _serve(fn, PadCollate(side="left", add_position_ids=True), items)
    assert len(seen) == 1 and len(seen[0]["input_ids"]) == len(items)
    for item, got in zip(items, out):
        with torch.inference_mode():
            alone = entry.main_output(model(**{k: v[None] for k, v in item.items()}, **options))[0]
        main = entry.main_output(got)
        assert main.shape == alone.shape
        torch.testing.assert_close(main, alone, rtol=1e-4, atol=1e-5)


def test_left_position_ids_count_real_tokens() -> None:
    items = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]
    batch = PadCollate(side="left", add_position_ids=True).collate(items)[0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [1, 1, 0]]  # padding: 1, as generate
    own = [{"input_ids": [1, 2], "position_ids": [5, 6]}, {"input_ids": [4], "position_ids": [7]}]
    assert PadCollate(side="left", add_position_ids=True).collate(own)[0][
        "position_ids"
    ].tolist() == [[5, 6], [0, 7]]
    assert "position_ids" not in PadCollate(side="left", add_position_ids=False).collate(items)[0]
    assert "position_ids" not in PadCollate().collate(items)[0]  # right padding needs none


def test_left_padding_without_the_option_warns_once_and_adds_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Adding them by default broke models (and compiled or exported graphs) that take no
    # position_ids: opt in, and the default says so once.
    items = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]
    collate = PadCollate(side="left")
    with caplog.at_level(logging.WARNING, logger="fastinfer.batching"):
        for _ in range(3):
            assert "position_ids" not in collate.collate(items)[0]
        PadCollate(side="left", add_position_ids=False).collate(items)
    warnings = [r for r in caplog.records if "add_position_ids=True" in r.getMessage()]
    assert len(warnings) == 1


# ------------------------------------------------------------------------------------- numpy


@pytest.mark.parametrize("collate", [PadCollate(), StackCollate()], ids=["pad", "stack"])
def test_numpy_items_torch_cannot_take_as_they_are(collate: Any) -> None:
    batch = collate.collate([np.flip(np.arange(3)), np.arange(3)])[0]
    data = batch.data if isinstance(collate, PadCollate) else batch
    assert data.tolist() == [[2, 1, 0], [0, 1, 2]]
    big_endian = np.arange(3, dtype=">i4")
    batch = collate.collate([big_endian, big_endian])[0]
    assert (batch.data if isinstance(collate, PadCollate) else batch).tolist()[1] == [0, 1, 2]
    with pytest.raises(BatchError, match=r"item 1 is a numpy array of dtype <U1.*numeric"):
        collate.collate([np.arange(2), np.array(["a", "b"])])
    with pytest.raises(BatchError, match=r"item 0\['x'\] is a numpy array of dtype object"):
        collate.collate([{"x": np.array([None, 1])}, {"x": np.array([None, 2])}])


# ------------------------------------------------------------------- values of one dict item


@pytest.mark.parametrize(
    "item",
    [
        {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1, 1, 1, 1]},  # shorter: a token hidden
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 0, 1]},  # longer
        {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1]])},
    ],
    ids=["short-mask", "long-type-ids", "tokenizer-shaped"],
)
def test_a_dict_item_whose_values_differ_in_length_is_refused(item: dict[str, Any]) -> None:
    # Before: the shorter mask was padded with 0 like the batch's padding, so a real token was
    # masked out and the caller got a different answer with no error.
    other = {k: [1, 1] for k in item}
    with pytest.raises(BatchError, match=r"item 1\[.*\] has \d+ positions but its 'input_ids'"):
        PadCollate().collate([other, item])


@pytest.mark.parametrize(
    "extra",
    [{"length": [5]}, {"idx": torch.tensor([7])}],
    ids=["return_length", "caller-id"],
)
def test_a_dict_items_other_keys_are_not_held_to_its_length(extra: dict[str, Any]) -> None:
    # A regression of the check above: a tokenizer's `return_length=True` gives `length` (1,),
    # and callers add ids; such keys were padded as sequences before and still are.
    items = [{"input_ids": [5, 6, 7, 8, 9], **extra}, {"input_ids": [1, 2], **extra}]
    batch, _ = PadCollate().collate(items)
    assert batch["input_ids"].shape == (2, 5)
    assert batch[next(iter(extra))].shape == (2, 5)
