"""Private parts of :mod:`fastinfer.batching` (collation and the adaptive cost model)."""
