"""What a replacement encoder checks before it takes its fast path.

The fast path runs the weights of the layers it was built from, without calling those layers.
That is only right while

* the module tree under the encoder is still the one it was built from (no Linear replaced by
  ``quantize_dynamic``, a LoRA wrapper or a user; no layer swapped out),
* no hook on those modules expects them to run (a forward hook extracting features, a
  pre-hook changing inputs), and
* no parameter wants a gradient (the fast path's cached weights are detached).

:class:`TreeGuard` answers that per call for a few microseconds: it compares every parent's
child entry with a snapshot (one C-level ``map`` over the tree's edges), reads PyTorch's hook
counter (``RemovableHandle.next_id`` moves whenever any hook is registered anywhere) and walks the
tree again only when one of them moved, or while the fast path is refused (the original encoder
then runs, which costs far more than the walk).
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["GuardedEncoder", "TreeGuard", "tracing"]

logger = logging.getLogger("fastinfer.attention")

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def tracing(*, compiling: bool = True) -> bool:
    """Whether this call is being traced (``torch.jit.trace``), exported (``torch.export``) or,
    with ``compiling``, compiled (``torch.compile``): the replacement encoders then run the
    original modules, whose plain ops those tools handle (the fast paths have data-dependent
    shapes and opaque kernels)."""
    if torch.jit.is_tracing():
        return True
    return bool(torch.compiler.is_compiling() if compiling else torch.compiler.is_exporting())


def _ignored(hook: Any) -> bool:
    """Hooks that do not need the original layers to run on every call: fastinfer's own
    diagnostic pre-hooks, and transformers' output-capture hooks (installed on the layers the
    first time ``output_hidden_states`` / ``output_attentions`` is used; they record only while a
    collector is active, and then the encoder runs the original layers anyway)."""
    if getattr(hook, "_fastinfer_diag", False):
        return True
    where = f"{getattr(hook, '__module__', '')}.{getattr(hook, '__qualname__', '')}"
    return where.startswith("transformers.") and "output_capturing" in where


def _hooks_on(m: nn.Module) -> list[str]:
    kinds = []
    for attr in _MODULE_HOOKS:
        hooks = getattr(m, attr, None)
        if hooks and any(not _ignored(h) for h in hooks.values()):
            kinds.append(attr.strip("_").replace("_hooks", "").replace("_", "-"))
    if "forward" in m.__dict__:  # forward wrapped on the instance (accelerate's hooks do that)
        kinds.append("forward-wrapper")
    return kinds


class TreeGuard:
    """A snapshot of the module tree under ``root``; :meth:`why_not` is the per-call check.

    ``rebuild`` is called whenever the tree changed (and once at the start): it re-reads what the
    fast path runs from the current tree and returns why it cannot run it ("" when it can).
    """

    def __init__(self, root: nn.Module, rebuild: Callable[[], str]) -> None:
        self.root = root
        self.rebuild = rebuild
        self.hook_gen = -1  # RemovableHandle.next_id when the hooks were last looked at
        self.dicts: list[Any] = []  # every parent's _modules and _parameters ...
        self.names: list[str] = []  # ... the child's name in it ...
        self.children: list[Any] = []  # ... and the child the fast path was built with
        self.params: list[Any] = []  # every parameter
        self.structure = ""  # why the current tree cannot take the fast path
        self.reason = "not checked yet"  # why the fast path cannot run now ("" = it can)
        self.logged = ""
        self.lock = threading.Lock()

    def changed(self) -> bool:
        # identity, in C: a Tensor's == would compare values
        return any(map(operator.is_not, map(dict.get, self.dicts, self.names), self.children))

    def why_not(self) -> str:
        """The empty string when the fast path may run, else why the original encoder has to."""
        if self.reason or RemovableHandle.next_id != self.hook_gen or self.changed():
            # one re-read at a time; a caller that slips past meanwhile sees a reason, falls back
            with self.lock:
                self._refresh()
        return self.reason

    def wants_grad(self) -> bool:
        """Whether any parameter under ``root`` requires grad (for grad mode only; call
        :meth:`why_not` first: a Parameter replaced since is seen there)."""
        return any(map(_REQUIRES_GRAD, self.params))

    def _refresh(self) -> None:
        gen = RemovableHandle.next_id
        if self.hook_gen == -1 or self.changed():
            self.reason = "its module tree changed and is being read again"
            self._snapshot()
            try:
                self.structure = self.rebuild()
            except Exception as exc:  # a tree the fast path cannot even read
                self.structure = f"its layers cannot be read ({type(exc).__name__}: {exc})"
        self.hook_gen = gen
        reason = self.structure or self._hooked()
        if reason and reason != self.logged:
            logger.info("%s runs the original encoder: %s", type(self.root).__name__, reason)
        self.logged = self.reason = reason

    def _snapshot(self) -> None:
        self.dicts, self.names, self.children, self.params = [], [], [], []
        for m in self.root.modules():
            for entries in (m._modules, m._parameters):  # a Linear replaced; a new Parameter
                for name, child in entries.items():
                    self.dicts.append(entries)
                    self.names.append(name)
                    self.children.append(child)
            self.params += [p for p in m._parameters.values() if p is not None]

    def _hooked(self) -> str:
        registry = torch.nn.modules.module
        for attr in _GLOBAL_HOOKS:
            hooks = getattr(registry, attr, None)
            if hooks and any(not _ignored(h) for h in hooks.values()):
                return "a global module hook is registered (register_module_forward_hook & co.)"
        for name, m in self.root.named_modules():
            kinds = _hooks_on(m) if name else []  # the replacement's own hooks run as usual
            if kinds:
                return (
                    f"{'/'.join(kinds)} hook(s) on its submodule {name!r} need the original "
                    "modules to run"
                )
        return ""


class GuardedEncoder(nn.Module):
    """What the replacement encoders share: a :class:`TreeGuard` over their own tree, built on
    first use (so a copy checks its own tree), and a weight cache (``_fastinfer_cache``) dropped
    when weights are loaded. A subclass implements :meth:`_rebuild`."""

    def _rebuild(self) -> str:
        """Re-read the fast path's parts from the layers held now; why it cannot run, or ""."""
        raise NotImplementedError

    @property
    def fallback_reason(self) -> str:
        """Why the original encoder runs whatever the inputs ("" when the fast path may run):
        hooks on its modules, modules replaced by ones the fast path cannot run."""
        return self._guard().why_not()

    def _guard(self) -> TreeGuard:
        guard = self.__dict__.get("_fastinfer_guard")
        if guard is None:  # built, or copied (a copy checks its own tree on its first call)
            guard = self.__dict__["_fastinfer_guard"] = TreeGuard(self, self._rebuild)
        return guard  # type: ignore[no-any-return]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Weights loaded in place into inference tensors (no version counter to tell): the
        # cached concatenated / reordered weights must go, whatever their key says.
        self.__dict__.pop("_fastinfer_cache", None)
        super()._load_from_state_dict(*args, **kwargs)
