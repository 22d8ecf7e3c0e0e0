"""LoadReport: what one load did (phase times, bytes mapped vs copied, memory, keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastinfer.loading._formats import preview

__all__ = ["LoadReport"]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class LoadReport:
    """What one load did: phase times (seconds), bytes mapped vs copied, memory, keys.

    ``private_bytes`` is this process's private anonymous resident memory after the load (the
    memory a second worker would not share); ``shared_bytes`` its file-backed resident memory
    (page-cache pages, shared with every process that maps the same file); ``private_added_bytes``
    how much private memory the load itself added.
    """

    checkpoint: str
    format: str
    files: tuple[str, ...]
    keys_loaded: int
    keys_tied: int
    construct_seconds: float
    map_seconds: float
    assign_seconds: float
    first_touch_seconds: float
    bytes_mapped: int
    bytes_copied: int
    private_bytes: int
    shared_bytes: int
    pss_bytes: int
    private_added_bytes: int
    dtype: str | None
    device: str
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def total_seconds(self) -> float:
        return (
            self.construct_seconds
            + self.map_seconds
            + self.assign_seconds
            + self.first_touch_seconds
        )

    def __str__(self) -> str:
        lines = [
            f"LoadReport: {self.keys_loaded} tensors from {self.checkpoint} ({self.format}, "
            f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}) in {self.total_seconds:.3f}s",
            f"  phases: construct {self.construct_seconds:.3f}s, map {self.map_seconds:.3f}s, "
            f"assign {self.assign_seconds:.3f}s, first touch {self.first_touch_seconds:.3f}s",
            f"  bytes: mapped {_mib(self.bytes_mapped)}, copied {_mib(self.bytes_copied)}"
            f"{f' (dtype {self.dtype})' if self.dtype else ''} on {self.device}",
            f"  memory: private {_mib(self.private_bytes)} (+{_mib(self.private_added_bytes)} "
            f"by this load), shared {_mib(self.shared_bytes)}, PSS {_mib(self.pss_bytes)}",
        ]
        if self.keys_tied:
            lines.append(f"  tied: {self.keys_tied} names share a loaded tensor")
        if self.missing_keys:
            lines.append(f"  missing (kept as built): {preview(list(self.missing_keys))}")
        if self.unexpected_keys:
            lines.append(f"  unexpected (ignored): {preview(list(self.unexpected_keys))}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
