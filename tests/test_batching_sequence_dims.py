"""Padded batches give each caller what the model gives its item alone (issue 18).

Which output dims are sequence dims comes from a declaration (``PadCollate(sequence_dims=...)``)
or from the output's type (Hugging Face ``ModelOutput`` fields), never from comparing sizes; where
neither tells, the caller gets a clear error saying how to declare it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from fastinfer import BatchError, ConfigError, DynamicBatcher
from fastinfer import testing as ft
from fastinfer.batching import PadCollate


def _items() -> list[list[int]]:
    return [[5, 6, 7, 8], [9], [10, 11]]


def _split(collate: PadCollate, output_fn: Any, items: Any = None) -> list[Any]:
    items = _items() if items is None else items
    batch, ctx = collate.collate(items)
    return collate.split(output_fn(batch), ctx, len(items))


def test_declared_dims_cut_each_item_to_its_length() -> None:
    def fn(batch: Any) -> dict[str, torch.Tensor]:
        b, t = batch.data.shape
        return {
            "tokens": batch.data[..., None].float().expand(b, t, 3),  # (B, T, 3)
            "pooled": torch.ones(b, t),  # (B, 4): as wide as the batch is long, not per token
            "scores": batch.data[:, :, None] * batch.data[:, None, :],  # (B, T, T)
        }

    collate = PadCollate(sequence_dims={"tokens": 1, "pooled": None, "scores": (1, 2)})
    out = _split(collate, fn)
    for item, got in zip(_items(), out):
        n = len(item)
        assert got["tokens"].shape == (n, 3) and got["tokens"][:, 0].tolist() == item
        assert got["pooled"].shape == (4,)  # never cut, although 4 == the padded length
        assert got["scores"].shape == (n, n)


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_dim_for_every_output_and_positions_for_tuples(side: str) -> None:
    collate = PadCollate(side=side, sequence_dims=1)
    out = _split(collate, lambda b: b.data * 2)
    assert [o.tolist() for o in out] == [[2 * v for v in it] for it in _items()]
    by_position = PadCollate(side=side, sequence_dims={0: 1, 1: None})
    out = _split(by_position, lambda b: (b.data, b.data.sum(1, keepdim=True).expand(-1, 4)))
    assert [o[0].tolist() for o in out] == _items()
    assert [o[1].shape for o in out] == [(4,)] * 3


def test_numpy_outputs_are_cut_too() -> None:
    out = _split(PadCollate(sequence_dims=1), lambda b: b.data.numpy() * 1.5)
    assert [o.shape for o in out] == [(4,), (1,), (2,)] and isinstance(out[0], np.ndarray)


def test_an_undeclared_output_is_an_error_that_shows_how_to_declare_it() -> None:
    with pytest.raises(BatchError, match=r"sequence_dims=1.*sequence_dims=None"):
        _split(PadCollate(), lambda b: b.data[..., None].float().expand(-1, -1, 4))
    with pytest.raises(BatchError, match=r"sequence_dims=\{'emb': 1\}"):
        _split(PadCollate(), lambda b: {"emb": torch.zeros(3, 4, 8)})
    # A 1-D output has nothing but the batch dim: nothing to declare.
    assert [float(o) for o in _split(PadCollate(), lambda b: b.data.sum(1).float())] == [26, 9, 21]
    # Returned padded, as before, only when asked.
    out = _split(PadCollate(unpad_outputs=False), lambda b: b.data)
    assert [tuple(o.shape) for o in out] == [(4,)] * 3


def test_a_declared_dim_that_is_not_the_padded_length_is_refused() -> None:
    with pytest.raises(
        BatchError, match=r"in dim 1, but that dim has size 7, not the padded length 4"
    ):
        _split(PadCollate(sequence_dims=1), lambda b: torch.zeros(3, 7))


@pytest.mark.parametrize("bad", [0, -1, True, "yes", {"x": "y"}, [1]])
def test_bad_declarations_are_refused_when_built(bad: Any) -> None:
    with pytest.raises(ConfigError, match="sequence_dims"):
        PadCollate(sequence_dims=bad)


@pytest.mark.transformers
@pytest.mark.parametrize(
    "options",
    [{}, {"pad_to_multiple_of": 32}, {"pad_to_multiple_of": 32, "unpad_outputs": True}],
    ids=["default", "multiple-of-32", "multiple-of-32-unpad"],
)
def test_hf_outputs_per_item_equal_the_model_alone(options: dict[str, Any]) -> None:
    """BERT's hidden size is 32: padded to a multiple of 32, ``pooler_output`` (B, 32) is exactly
    as wide as the batch is long; its type says it is pooled, so it is never cut."""
    entry = ft.zoo_model("bert")
    model = entry.build()
    model.set_attn_implementation("eager")  # sdpa returns no attention maps
    items = entry.items(5)

    def fn(batch: dict[str, torch.Tensor]) -> Any:
        with torch.inference_mode():
            return model(**batch, output_hidden_states=True, output_attentions=True)

    async def main() -> list[Any]:
        collate = PadCollate(**options)  # sequence_dims="auto"
        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, collate=collate) as b:
            return await asyncio.gather(*(b.submit(it) for it in items))

    results = asyncio.run(main())
    for item, got in zip(items, results):
        with torch.inference_mode():
            alone = model(**{k: v[None] for k, v in item.items()}, output_hidden_states=True)
        n = len(item["input_ids"])
        assert got["last_hidden_state"].shape == alone.last_hidden_state[0].shape == (n, 32)
        torch.testing.assert_close(got["last_hidden_state"], alone.last_hidden_state[0])
        torch.testing.assert_close(got["pooler_output"], alone.pooler_output[0])
        assert [h.shape for h in got["hidden_states"]] == [(n, 32)] * 2
        assert got["attentions"][0].shape == (2, n, n)


@pytest.mark.transformers
def test_a_sentence_transformers_features_dict_is_known_too() -> None:
    model = ft.SentenceEncoder(ft.zoo_model("bert").build()).eval()
    items = ft.zoo_model("bert").items(4)

    def fn(batch: dict[str, torch.Tensor]) -> Any:
        with torch.inference_mode():
            return model(batch)

    async def main() -> list[Any]:
        async with DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, collate="pad") as b:
            return await asyncio.gather(*(b.submit(it) for it in items))

    for item, got in zip(items, asyncio.run(main())):
        with torch.inference_mode():
            alone = model({k: v[None] for k, v in item.items()})
        n = len(item["input_ids"])
        assert got["token_embeddings"].shape == (n, 32) and got["input_ids"].shape == (n,)
        torch.testing.assert_close(got["sentence_embedding"], alone["sentence_embedding"][0])
