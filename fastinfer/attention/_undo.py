"""Undo bookkeeping: every change a candidate makes pushes the action that reverts it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["Undo", "find_parent"]


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
        self.push(lambda: parent._modules.__setitem__(name, old))

    def freeze(self, model: nn.Module) -> None:
        """eval() and requires_grad_(False) everywhere (inference preparation), restorable."""
        modes = [(m, m.training) for m in model.modules()]
        grads = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)

        def restore() -> None:
            for m, t in modes:
                m.training = t
            for p, g in grads:
                p.requires_grad_(g)

        self.push(restore)


def find_parent(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str] | None:
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is target:
                return parent, name
    return None
