"""save_weights / load_weights_ on the state dict of a ``torch.ao.quantization`` model (outside
probe): it holds packed parameters (tuples of quantized tensors) and a ``torch.dtype`` per layer.
``save_weights`` raised a raw ``AttributeError: 'torch.dtype' object has no attribute 'is_meta'``;
both now name the entries and the fix in a ``CheckpointError``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fastinfer

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.ao.quantization is deprecated:DeprecationWarning",
    "ignore:torch.quantize_per_tensor:UserWarning",
    "ignore:TypedStorage is deprecated:UserWarning",
)


def _quantized() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"], ids=["torch", "safetensors"])
def test_save_weights_names_the_entries_of_a_quantized_state_dict(
    suffix: str, tmp_path: Path
) -> None:
    path = tmp_path / f"q{suffix}"
    with pytest.raises(fastinfer.CheckpointError, match=r"entries are not tensors") as info:
        fastinfer.save_weights(_quantized(), path)
    message = str(info.value)
    assert "0._packed_params.dtype (dtype)" in message, message
    assert "quantize after loading" in message and "weights_only=True" in message, message
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_load_weights_names_a_quantized_state_dict_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "q.pt"
    torch.save(_quantized().state_dict(), path)
    with pytest.raises(fastinfer.CheckpointError, match=r"quantize after loading") as info:
        fastinfer.load_weights_(_quantized(), path)
    assert "_packed_params" in str(info.value)
    # The fix the message gives works (weights_only: no full unpickle needed).
    restored = _quantized()
    restored.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(3, 8)
    torch.testing.assert_close(restored(x), _quantized()(x))


def test_a_quantized_tensor_is_refused_for_safetensors(tmp_path: Path) -> None:
    qt = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(fastinfer.CheckpointError, match=r"no quantized tensors.*'w'"):
        fastinfer.save_weights({"w": qt, "b": torch.zeros(2)}, tmp_path / "q.safetensors")
    assert list(tmp_path.iterdir()) == []
