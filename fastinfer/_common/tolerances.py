"""Per-dtype numeric tolerances for "same as eager" checks, in one table.

Every place that decides whether an optimised path computes the same thing as the original
(compile verification, attention-path verification, backend selection) reads this table, and every
pair is ``(rtol, atol)`` in that order, as :func:`torch.testing.assert_close` takes them. A value
``x`` matches ``ref`` when ``|x - ref| <= atol + rtol * |ref|``.

Why these values: fused kernels and reordered (prepacked) weights change the order of float
reductions, so an exact match is not expected; the float32 pair admits what oneDNN's and Inductor's
reassociation does on encoder-sized reductions and still rejects a kernel built for another ISA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["Tolerance", "tolerance_for"]


class Tolerance(NamedTuple):
    rtol: float
    atol: float


# dtype name (as in ``str(torch.float32)`` without "torch.") -> tolerance
_TABLE: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-6, atol=1e-7),
    "float32": Tolerance(rtol=1e-3, atol=1e-4),
    "float16": Tolerance(rtol=1e-2, atol=1e-2),
    "bfloat16": Tolerance(rtol=5e-2, atol=5e-2),
}
_EXACT = Tolerance(rtol=0.0, atol=0.0)  # integer and bool outputs must match exactly


def tolerance_for(
    dtype: torch.dtype, *, rtol: float | None = None, atol: float | None = None
) -> Tolerance:
    """The table's ``(rtol, atol)`` for ``dtype``; a non-None ``rtol``/``atol`` overrides its part."""
    base = _TABLE.get(str(dtype).removeprefix("torch."), _EXACT)
    return Tolerance(
        rtol=base.rtol if rtol is None else float(rtol),
        atol=base.atol if atol is None else float(atol),
    )
