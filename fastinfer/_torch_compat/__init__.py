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

from fastinfer._torch_compat._compiling import (
    aoti_load_package_runner,
    compile_cache_counts,
    dynamo_counters,
    dynamo_unique_graphs,
    functorch_config,
    guard_error_logger,
    inductor_clear_caches,
    inductor_config,
    inductor_config_patch,
    inductor_cpu_vec_isa,
    mark_dynamic,
    torch_dispatch_mode,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from fastinfer._torch_compat._kernels import (
    canonical_masks,
    mha_fastpath_disabled,
    mha_fastpath_enabled,
    mkldnn_linear_pointwise,
    mkldnn_reorder_linear_weight,
    nested_from_mask,
    nested_mask_left_aligned,
    spend_nested_prototype_warning,
    transformer_encoder_layer_fwd,
)
from fastinfer._torch_compat._registry import ENTRIES, TESTED_TORCH, Entry, check
from fastinfer._torch_compat._shared_memory import shared_tensor_reducer

__all__ = [
    "ENTRIES",
    "TESTED_TORCH",
    "Entry",
    "aoti_load_package_runner",
    "canonical_masks",
    "check",
    "compile_cache_counts",
    "dynamo_counters",
    "dynamo_unique_graphs",
    "functorch_config",
    "guard_error_logger",
    "inductor_clear_caches",
    "inductor_config",
    "inductor_config_patch",
    "inductor_cpu_vec_isa",
    "mark_dynamic",
    "mha_fastpath_disabled",
    "mha_fastpath_enabled",
    "mkldnn_linear_pointwise",
    "mkldnn_reorder_linear_weight",
    "nested_from_mask",
    "nested_mask_left_aligned",
    "shared_tensor_reducer",
    "spend_nested_prototype_warning",
    "torch_dispatch_mode",
    "transformer_encoder_layer_fwd",
    "tree_flatten",
    "tree_leaves",
    "tree_unflatten",
]
