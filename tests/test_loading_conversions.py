"""load_model / load_pretrained on the checkpoints people actually have (issue 18).

- construction on meta never runs an initialiser through torch's Python reference kernels (an
  ``nn.Embedding`` with ``padding_idx`` used to import torch._dynamo and sympy);
- checkpoints in the saved (legacy) key format load as ``from_pretrained`` loads them:
  transformers' own renames, fusions and parametrization conversions are applied;
- the encoder of an encoder-decoder loads from the whole model's folder.
"""

from __future__ import annotations

from conftest import run_python


def test_embedding_init_on_meta_imports_no_reference_kernels() -> None:
    code = """
import sys, tempfile, torch, fastinfer
from torch import nn

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16, padding_idx=0)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.embed(ids))

path = tempfile.mkdtemp() + "/t.safetensors"
eager = Tagger().eval()
fastinfer.save_weights(eager, path)
heavy = ("torch._dynamo", "sympy", "torch._refs", "torch._meta_registrations")
before = set(sys.modules)
model = fastinfer.load_model(Tagger, path)
added = set(sys.modules) - before
ids = torch.tensor([[0, 3, 7]])
assert torch.equal(model(ids), eager(ids))
print(sorted(h for h in heavy if h in added), len(added))
"""
    heavy, count = run_python(code).stdout.strip().rsplit(" ", 1)
    assert heavy == "[]" and int(count) < 15, (heavy, count)
