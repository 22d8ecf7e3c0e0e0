"""Dynamo and Inductor internals (used by fastinfer.compiling)."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from fastinfer._torch_compat._registry import check, entry, params

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


def compile_cache_counts() -> tuple[int, int, int, int, int]:
    """FX-graph cache hits, misses, bypasses and AOTAutograd cache hits, misses (process totals)."""
    counters = dynamo_counters()
    return tuple(int(counters[g][k]) for g, k in _COUNTER_KEYS[1:])  # type: ignore[return-value]


def dynamo_unique_graphs() -> int:
    return int(dynamo_counters()["stats"]["unique_graphs"])


@entry(
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


@entry(
    "mark_dynamic",
    "torch._dynamo.mark_dynamic(tensor, dim, min=, max=)",
    "compiling: one graph covers batch sizes 2..max",
    "2.1 - 2.13",
)
def _probe_mark_dynamic() -> str:
    from torch._dynamo import mark_dynamic as mark

    names = params(mark)
    missing = [p for p in ("t", "index", "min", "max") if p not in names]
    return f"mark_dynamic's parameters are {names}; missing {missing}" if missing else ""


def guard_error_logger() -> logging.Logger:
    """The logger dynamo reports a guard it cannot build on (ERROR, with a traceback)."""
    return logging.getLogger("torch._guards")


@entry(
    "guard_error_logger",
    'logging.getLogger("torch._guards") (torch._guards.log)',
    "compiling: compile_model quiets it while it tries a dynamic batch dimension it may refuse",
    "2.1 - 2.13",
)
def _probe_guard_logger() -> str:
    import torch._guards as guards

    if getattr(guards, "log", None) is not guard_error_logger():
        return "torch._guards no longer logs through logging.getLogger('torch._guards')"
    return ""


def inductor_config() -> Any:
    from torch._inductor import config

    return config


def functorch_config() -> Any:
    from torch._functorch import config

    return config


def inductor_clear_caches() -> None:
    from torch._inductor.utils import clear_caches

    clear_caches()


@entry(
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


def inductor_config_patch(changes: dict[str, Any]) -> Any:
    """``torch._inductor.config.patch(changes)``: a context manager that sets inductor settings
    (dotted names such as ``"cpp.weight_prepack"``) and restores them on exit."""
    return inductor_config().patch(changes)


@entry(
    "inductor_config_patch",
    "torch._inductor.config.patch({'freezing': ..., 'cpp.weight_prepack': ...})",
    "compiling: compile_model turns freezing on (and weight prepacking off) during warm-up",
    "2.5 - 2.13",
)
def _probe_inductor_config_patch() -> str:
    cfg = inductor_config()
    if not callable(getattr(cfg, "patch", None)):
        return "torch._inductor.config.patch is gone"
    if not hasattr(cfg, "freezing") or not hasattr(getattr(cfg, "cpp", None), "weight_prepack"):
        return "config.freezing or config.cpp.weight_prepack is gone"
    before = (cfg.freezing, cfg.cpp.weight_prepack)
    with inductor_config_patch({"freezing": not before[0], "cpp.weight_prepack": not before[1]}):
        inside = (cfg.freezing, cfg.cpp.weight_prepack)
    after = (cfg.freezing, cfg.cpp.weight_prepack)
    if inside != (not before[0], not before[1]) or after != before:
        return f"patch did not set and restore the settings: {before} -> {inside} -> {after}"
    return ""


def inductor_cpu_vec_isa() -> Any:
    """``torch._inductor.cpu_vec_isa`` (None when it cannot be imported)."""
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:
        return None
    return cpu_vec_isa


@entry(
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
    if len(params(isa.VecISA._probe_load)) != 2:
        return f"VecISA._probe_load takes {params(isa.VecISA._probe_load)}, expected (self, output_path)"
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


@entry(
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


@entry(
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


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    from torch.utils._pytree import tree_flatten as flatten

    leaves, spec = flatten(tree)
    return list(leaves), spec


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    from torch.utils._pytree import tree_unflatten as unflatten

    return unflatten(leaves, spec)


@entry(
    "pytree",
    "torch.utils._pytree.tree_leaves / tree_flatten / tree_unflatten",
    "compiling: compares every output tensor of nested outputs with eager; ONNX Runtime and "
    "OpenVINO give back eager's output structure",
    "2.0 - 2.13",
)
def _probe_pytree() -> str:
    a, b = torch.ones(1), torch.zeros(1)
    tree = {"x": (a, [b]), "y": 3}
    got = tree_leaves(tree)
    if not (len(got) == 3 and got[0] is a and got[1] is b):
        return f"tree_leaves gave {got}"
    leaves, spec = tree_flatten(tree)
    back = tree_unflatten(leaves, spec)
    return "" if back["x"][1][0] is b and back["y"] == 3 else f"tree_unflatten gave {back}"
