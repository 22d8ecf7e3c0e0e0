"""Every private torch API fastinfer touches, in one place, each with a feature probe.

PyTorch's private functions change without a deprecation cycle. A library that calls them from six
files finds out on a new torch by a statistic that silently reads 0 or a reason that is silently
wrong. Here each private access is one function, registered as an :class:`Entry` with the torch
versions it is known to work with and a probe that checks, on the torch that is installed, that the
API still has the shape fastinfer relies on (names, arguments, counter keys). The test suite runs
every probe (``tests/test_torch_compat.py``), so an incompatible torch fails CI loudly, by name.

Modules behind a probe are imported lazily: ``import fastinfer`` must not import ``torch._dynamo``
or ``torch._inductor``. Callers keep their own fallback where one exists (the oneDNN dense layer
falls back to ``F.linear``); :func:`check` turns a failed probe into :class:`CompileError`-style
messages for paths that have none.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ENTRIES",
    "Entry",
    "aoti_load_package_runner",
    "check",
    "dynamo_counters",
    "dynamo_unique_graphs",
    "functorch_config",
    "inductor_clear_caches",
    "inductor_config",
    "inductor_cpu_vec_isa",
    "mark_dynamic",
    "mha_fastpath_enabled",
    "mkldnn_linear_pointwise",
    "mkldnn_reorder_linear_weight",
    "nested_from_mask",
    "nested_mask_left_aligned",
    "shared_tensor_reducer",
    "torch_dispatch_mode",
    "transformer_encoder_layer_fwd",
    "tree_leaves",
]

#: The torch release the whole suite runs on in CI; every probe below is checked there.
TESTED_TORCH = "2.13"


@dataclass(frozen=True)
class Entry:
    """One private torch API: what it is, who uses it, where it is known to work, and its probe.

    ``probe()`` returns ``""`` when the API has the expected shape on this torch, else why not.
    """

    name: str
    api: str
    used_by: str
    known_versions: str
    probe: Callable[[], str]


ENTRIES: dict[str, Entry] = {}


def _entry(name: str, api: str, used_by: str, known_versions: str) -> Callable[..., Any]:
    def register(probe: Callable[[], str]) -> Callable[[], str]:
        ENTRIES[name] = Entry(name, api, used_by, known_versions, probe)
        return probe

    return register


def check(name: str) -> str:
    """The probe's verdict for entry ``name`` ("" when the API holds), never raising."""
    try:
        return ENTRIES[name].probe()
    except Exception as exc:  # a probe that crashes is a failed probe
        return f"probe raised {type(exc).__name__}: {exc}"


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


# --------------------------------------------------------------------------------------------
# Dynamo / Inductor (compiling)
# --------------------------------------------------------------------------------------------

# Counter keys fastinfer reads: (group, key). A renamed key would make a statistic read 0 forever.
_COUNTER_KEYS = (
    ("stats", "unique_graphs"),
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_miss"),
    ("inductor", "fxgraph_cache_bypass"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_miss"),
)


def dynamo_counters() -> Any:
    """``torch._dynamo.utils.counters``: nested ``Counter``s of compile events."""
    from torch._dynamo.utils import counters

    return counters


def dynamo_unique_graphs() -> int:
    return int(dynamo_counters()["stats"]["unique_graphs"])


@_entry(
    "dynamo_counters",
    "torch._dynamo.utils.counters[group][key]",
    "compiling: graph and compile-cache counts in CompiledModel/InductorCache statistics",
    "2.5 - 2.13",
)
def _probe_counters() -> str:
    """Compile a tiny function into a fresh cache and see every counter key fastinfer reads move.

    Keys exist lazily in a ``Counter``, so reading them proves nothing; the probe compiles with
    the FX-graph cache on and checks that ``unique_graphs`` and one cache outcome were counted.
    """
    import os
    import tempfile

    from torch._dynamo.utils import counters

    if not hasattr(counters, "__getitem__"):
        return "torch._dynamo.utils.counters is not a mapping"
    before = {k: counters[g][k] for g, k in _COUNTER_KEYS}
    with tempfile.TemporaryDirectory() as d:
        env = {"TORCHINDUCTOR_CACHE_DIR": d, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            torch._dynamo.reset()
            fn = torch.compile(lambda x: (x * 2).sin(), backend="inductor")
            fn(torch.randn(3))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            torch._dynamo.reset()
    after = {k: counters[g][k] for g, k in _COUNTER_KEYS}
    if after["unique_graphs"] <= before["unique_graphs"]:
        return "compiling a function did not move counters['stats']['unique_graphs']"
    cache_keys = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")
    if sum(after[k] - before[k] for k in cache_keys) < 1:
        return f"compiling with the FX-graph cache on moved none of {cache_keys}"
    return ""


def mark_dynamic(t: torch.Tensor, dim: int, *, min: int, max: int) -> None:
    """``torch._dynamo.mark_dynamic``: compile one graph for a range of sizes of ``dim``."""
    from torch._dynamo import mark_dynamic as mark

    mark(t, dim, min=min, max=max)


@_entry(
    "mark_dynamic",
    "torch._dynamo.mark_dynamic(tensor, dim, min=, max=)",
    "compiling: one graph covers batch sizes 2..max",
    "2.1 - 2.13",
)
def _probe_mark_dynamic() -> str:
    from torch._dynamo import mark_dynamic as mark

    params = _params(mark)
    missing = [p for p in ("t", "index", "min", "max") if p not in params]
    return f"mark_dynamic's parameters are {params}; missing {missing}" if missing else ""


def inductor_config() -> Any:
    from torch._inductor import config

    return config


def functorch_config() -> Any:
    from torch._functorch import config

    return config


def inductor_clear_caches() -> None:
    from torch._inductor.utils import clear_caches

    clear_caches()


@_entry(
    "inductor_config",
    "torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache, "
    "torch._inductor.utils.clear_caches",
    "compiling: InductorCache turns the persistent caches on inside its `with` block",
    "2.5 - 2.13",
)
def _probe_inductor_config() -> str:
    cfg, fcfg = inductor_config(), functorch_config()
    missing = [
        n
        for n, o in (("fx_graph_cache", cfg), ("enable_autograd_cache", fcfg))
        if not hasattr(o, n)
    ]
    if missing:
        return f"config attributes missing: {missing}"
    from torch._inductor import utils

    return "" if callable(getattr(utils, "clear_caches", None)) else "clear_caches is gone"


def inductor_cpu_vec_isa() -> Any:
    """``torch._inductor.cpu_vec_isa`` (None when it cannot be imported)."""
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:
        return None
    return cpu_vec_isa


@_entry(
    "inductor_cpu_vec_isa",
    "torch._inductor.cpu_vec_isa.{valid_vec_isa_list (lru_cache), VecISA._probe_load, pick_vec_isa}",
    "compiling: InductorCache records and replays inductor's CPU ISA probe (warm start)",
    "2.5 - 2.13",
)
def _probe_vec_isa() -> str:
    isa = inductor_cpu_vec_isa()
    if isa is None:
        return "torch._inductor.cpu_vec_isa cannot be imported"
    listing = getattr(isa, "valid_vec_isa_list", None)
    if listing is None or not hasattr(listing, "cache_info"):
        return "valid_vec_isa_list is missing or no longer an lru_cache"
    if not callable(getattr(getattr(isa, "VecISA", None), "_probe_load", None)):
        return "VecISA._probe_load is gone"
    if len(_params(isa.VecISA._probe_load)) != 2:
        return f"VecISA._probe_load takes {_params(isa.VecISA._probe_load)}, expected (self, output_path)"
    return "" if callable(getattr(isa, "pick_vec_isa", None)) else "pick_vec_isa is gone"


_AOTI_ARGS = (
    "model_package_path",
    "model_name",
    "run_single_threaded",
    "num_runners",
    "device_index",
)


def aoti_load_package_runner(path: str) -> Any:
    """Load an AOTInductor package without torch's own ISA probe (``aoti_load_package`` compiles
    test programs first, which needs a C++ compiler and seconds); falls back to the public loader
    when the private one is not what this module knows."""
    if check("aoti_package_loader"):
        from torch import _inductor

        return _inductor.aoti_load_package(path)
    from torch._inductor.package.package import AOTICompiledModel

    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)  # type: ignore[attr-defined]
    return AOTICompiledModel(loader)


@_entry(
    "aoti_package_loader",
    "torch._C._aoti.AOTIModelPackageLoader(path, model_name, run_single_threaded, num_runners, "
    "device_index) + torch._inductor.package.package.AOTICompiledModel",
    "compiling: load_aot (falls back to torch._inductor.aoti_load_package)",
    "2.6 - 2.13",
)
def _probe_aoti() -> str:
    aoti = getattr(torch._C, "_aoti", None)
    loader = getattr(aoti, "AOTIModelPackageLoader", None)
    if loader is None:
        return "torch._C._aoti.AOTIModelPackageLoader is gone"
    doc = (getattr(loader.__init__, "__doc__", "") or "").replace(" ", "")
    # pybind11 signatures: the positional order fastinfer passes is (str, str, bool, int, int).
    m = re.search(r"__init__\(self:[^,]+,(.*?)\)->", doc)
    types = [a.split(":", 1)[1] for a in m.group(1).split(",")] if m else []
    shape = ["str", "str", "bool", "int", "int"]
    if len(types) != len(shape) or any(want not in got.lower() for want, got in zip(shape, types)):
        return (
            f"AOTIModelPackageLoader's constructor is not (str, str, bool, int, int): {doc[:300]}"
        )
    try:
        from torch._inductor.package.package import AOTICompiledModel  # noqa: F401
    except ImportError as exc:
        return f"AOTICompiledModel cannot be imported: {exc}"
    return ""


def torch_dispatch_mode() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


@_entry(
    "torch_dispatch_mode",
    "torch.utils._python_dispatch.TorchDispatchMode.__torch_dispatch__(func, types, args, kwargs)",
    "compiling: spots the opaque fused ops that torch.compile cannot see into",
    "2.0 - 2.13",
)
def _probe_dispatch_mode() -> str:
    seen: list[str] = []
    base = torch_dispatch_mode()

    class Spy(base):  # type: ignore[misc,valid-type]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.ones(2) + 1
    return "" if any("add" in s for s in seen) else f"the mode saw no aten.add: {seen}"


def tree_leaves(tree: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves as leaves

    return list(leaves(tree))


@_entry(
    "pytree",
    "torch.utils._pytree.tree_leaves",
    "compiling: compares every output tensor of nested outputs with eager",
    "2.0 - 2.13",
)
def _probe_pytree() -> str:
    a, b = torch.ones(1), torch.zeros(1)
    got = tree_leaves({"x": (a, [b]), "y": 3})
    return "" if len(got) == 3 and got[0] is a and got[1] is b else f"tree_leaves gave {got}"


# --------------------------------------------------------------------------------------------
# Fused attention kernels (attention)
# --------------------------------------------------------------------------------------------


def mkldnn_reorder_linear_weight(weight: torch.Tensor) -> Any:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def mkldnn_linear_pointwise(
    x: torch.Tensor, packed: Any, bias: torch.Tensor, act: str
) -> torch.Tensor:
    """``act(x @ packed.T + bias)`` on a reordered weight; ``act`` "", "relu" or "gelu" (exact)."""
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
        x, packed, bias, act or "none", [], algorithm
    )


@_entry(
    "mkldnn_linear",
    "torch.ops.mkldnn._reorder_linear_weight(w, batch_size) + "
    "torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algorithm)",
    "attention: the packed path's dense layers on CPU float32 (falls back to F.linear)",
    "2.1 - 2.13",
)
def _probe_mkldnn_linear() -> str:
    if not torch.backends.mkldnn.is_available():
        return "oneDNN is not available in this torch build"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return "torch.ops.mkldnn has no _reorder_linear_weight/_linear_pointwise"
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen) for s in ((4, 16), (8, 16), (8,)))
    packed = mkldnn_reorder_linear_weight(w)
    for act, ref in (
        ("", torch.nn.functional.linear(x, w, b)),
        ("relu", torch.relu(torch.nn.functional.linear(x, w, b))),
        ("gelu", torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))),
    ):
        got = mkldnn_linear_pointwise(x, packed, b, act)
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
            return f"_linear_pointwise with {act or 'no'} activation disagrees with F.linear"
    return ""


def transformer_encoder_layer_fwd(
    x: torch.Tensor,
    *,
    embed_dim: int,
    heads: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    gelu: bool,
    norm_first: bool,
    eps: float,
    norm1_weight: torch.Tensor,
    norm1_bias: torch.Tensor,
    norm2_weight: torch.Tensor,
    norm2_bias: torch.Tensor,
    ffn_in_weight: torch.Tensor,
    ffn_in_bias: torch.Tensor,
    ffn_out_weight: torch.Tensor,
    ffn_out_bias: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """``torch._transformer_encoder_layer_fwd`` with its 20 positional arguments named."""
    return torch._transformer_encoder_layer_fwd(
        x,
        embed_dim,
        heads,
        qkv_weight,
        qkv_bias,
        out_weight,
        out_bias,
        gelu,
        norm_first,
        eps,
        norm1_weight,
        norm1_bias,
        norm2_weight,
        norm2_bias,
        ffn_in_weight,
        ffn_in_bias,
        ffn_out_weight,
        ffn_out_bias,
        mask,
        None if mask is None else 1,
    )


@_entry(
    "transformer_encoder_layer_fwd",
    "torch._transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, "
    "proj_b, use_gelu, norm_first, eps, n1_w, n1_b, n2_w, n2_b, ffn1_w, ffn1_b, ffn2_w, ffn2_b, "
    "mask, mask_type)",
    "attention: the hf:fused path (PyTorch's fused encoder-layer kernel)",
    "2.0 - 2.13",
)
def _probe_encoder_layer_fwd() -> str:
    """Run the op on a real ``nn.TransformerEncoderLayer``'s weights; it must match the layer."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with torch.inference_mode():
        ref = layer._sa_block(x, None, None, is_causal=False)  # post-norm, as BERT
        ref = layer.norm1(x + ref)
        ref = layer.norm2(ref + layer._ff_block(ref))
        got = transformer_encoder_layer_fwd(
            x,
            embed_dim=8,
            heads=2,
            qkv_weight=layer.self_attn.in_proj_weight,
            qkv_bias=layer.self_attn.in_proj_bias,
            out_weight=layer.self_attn.out_proj.weight,
            out_bias=layer.self_attn.out_proj.bias,
            gelu=False,
            norm_first=False,
            eps=layer.norm1.eps,
            norm1_weight=layer.norm1.weight,
            norm1_bias=layer.norm1.bias,
            norm2_weight=layer.norm2.weight,
            norm2_bias=layer.norm2.bias,
            ffn_in_weight=layer.linear1.weight,
            ffn_in_bias=layer.linear1.bias,
            ffn_out_weight=layer.linear2.weight,
            ffn_out_bias=layer.linear2.bias,
            mask=None,
        )
    return (
        "" if torch.allclose(got, ref, atol=1e-5) else "the fused layer disagrees with the module"
    )


def nested_mask_left_aligned(x: torch.Tensor, valid: torch.Tensor) -> bool:
    return bool(torch._nested_tensor_from_mask_left_aligned(x, valid))


def nested_from_mask(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch warns on every first use that nested tensors are a prototype: nothing a user of
        # fastinfer can act on (the padding-free paths are verified against the original).
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage")
        return torch._nested_tensor_from_mask(x, valid, mask_check=False)


@_entry(
    "nested_from_mask",
    "torch._nested_tensor_from_mask(x, mask, mask_check=) + "
    "torch._nested_tensor_from_mask_left_aligned(x, mask)",
    "attention: fused and fastpath-nested paths skip padding with nested tensors",
    "2.0 - 2.13",
)
def _probe_nested() -> str:
    x = torch.randn(2, 3, 4)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    if not nested_mask_left_aligned(x, valid):
        return "a right-padded mask is not reported left-aligned"
    if nested_mask_left_aligned(x, valid.flip(1)):
        return "a left-padded mask is reported left-aligned"
    nt = nested_from_mask(x, valid)
    rows = nt.unbind()
    return "" if [r.shape[0] for r in rows] == [3, 1] else f"nested rows {[r.shape for r in rows]}"


def mha_fastpath_enabled() -> bool:
    return bool(torch.backends.mha.get_fastpath_enabled())


@_entry(
    "mha_fastpath",
    "torch.backends.mha.get_fastpath_enabled(), and the fastpath conditions of "
    "TransformerEncoder/TransformerEncoderLayer/MultiheadAttention.forward",
    "attention: explains why PyTorch's fastpath is not taken",
    "2.1 - 2.13",
)
def _probe_mha_fastpath() -> str:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not callable(getattr(mha, "get_fastpath_enabled", None)):
        return "torch.backends.mha.get_fastpath_enabled is gone"
    # The reasons fastinfer gives mirror the checks in these forwards; they must still exist.
    src = inspect.getsource(torch.nn.TransformerEncoderLayer.forward)
    for needle in ("why_not_sparsity_fast_path", "_transformer_encoder_layer_fwd"):
        if needle not in src:
            return f"TransformerEncoderLayer.forward no longer mentions {needle}"
    return ""


# --------------------------------------------------------------------------------------------
# Shared-memory tensors (pool)
# --------------------------------------------------------------------------------------------


def shared_tensor_reducer() -> Any:
    """The reduction ``torch.multiprocessing`` registers for tensors (shared-memory handles)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing

    return ForkingPickler._extra_reducers[torch.Tensor]  # type: ignore[attr-defined]


@_entry(
    "shared_tensor_reducer",
    "multiprocessing.reduction.ForkingPickler._extra_reducers[torch.Tensor] "
    "(registered by torch.multiprocessing)",
    "pool: tensors larger than 256 KiB travel to workers through shared memory",
    "1.0 - 2.13",
)
def _probe_reducer() -> str:
    reduce = shared_tensor_reducer()
    if not callable(reduce):
        return "no tensor reduction registered by torch.multiprocessing"
    rebuild, args = reduce(torch.ones(4))
    return "" if callable(rebuild) and isinstance(args, tuple) else "unexpected reduction shape"
