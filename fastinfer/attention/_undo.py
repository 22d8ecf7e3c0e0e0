"""Undo bookkeeping: every change a candidate makes pushes the action that reverts it.

The actions are plain data (the module, the attribute, the old value), not closures: the record
of a swap lives on the swapped model, so ``copy.deepcopy``, ``pickle`` and ``torch.save`` carry
it to the copy, pointing at the copy's own modules, and ``undo_attention_swap_(copy)`` works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["Call", "DropAttr", "SetAttr", "SetChild", "Undo", "find_parent"]


class SetChild:
    """Put ``old`` back as ``parent``'s child ``name``."""

    def __init__(self, parent: nn.Module, name: str, old: nn.Module | None) -> None:
        self.parent, self.name, self.old = parent, name, old

    def __call__(self) -> None:
        self.parent._modules[self.name] = self.old


class SetAttr:
    """``setattr(obj, name, value)``."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name, self.value = obj, name, value

    def __call__(self) -> None:
        setattr(self.obj, self.name, self.value)


class DropAttr:
    """Remove ``name`` from ``obj.__dict__`` (a mark the swap left on the model)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def __call__(self) -> None:
        self.obj.__dict__.pop(self.name, None)


class Call:
    """``fn(*args)``; ``fn`` a bound method, so that a copy of the record calls the copy's."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> None:
        self.fn(*self.args)


class _Unfreeze:
    def __init__(self, modes: list[tuple[nn.Module, bool]], grads: list[tuple[Any, bool]]):
        self.modes, self.grads = modes, grads

    def __call__(self) -> None:
        for m, t in self.modes:
            m.training = t
        for p, g in self.grads:
            p.requires_grad_(g)


class Undo:
    """A stack of restore actions, run in reverse."""

    def __init__(self) -> None:
        self.actions: list[Callable[[], None]] = []

    def push(self, fn: Callable[[], None]) -> None:
        self.actions.append(fn)

    def __call__(self) -> None:
        while self.actions:
            self.actions.pop()()

    def set_child(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = new
        self.push(SetChild(parent, name, old))

    def freeze(self, model: nn.Module) -> None:
        """eval() and requires_grad_(False) everywhere (inference preparation), restorable."""
        modes = [(m, m.training) for m in model.modules()]
        grads = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        self.push(_Unfreeze(modes, grads))


def find_parent(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str] | None:
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is target:
                return parent, name
    return None
