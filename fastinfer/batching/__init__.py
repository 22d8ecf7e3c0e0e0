"""Dynamic batching: many concurrent single-item calls, one batched forward pass.

    >>> batcher = DynamicBatcher(model_fn, max_batch_size=32, max_wait_ms=5)
    >>> result = await batcher.submit(item)          # from any asyncio code
    >>> result = batcher.submit_sync(item)           # from any thread, notebooks included

The batcher is work-conserving and late-binding: a batch is sealed only when an executor slot is
free (``max_concurrent_batches``), and while every slot is busy the pending batch keeps growing.
The wait (``max_wait_ms``) runs from the oldest queued request's arrival. ``policy="adaptive"``
learns the batch cost ``t ≈ a·n + b`` and the arrival rate online and dispatches as soon as waiting
no longer lowers expected latency. Deadlines, backpressure (``QueueFull``), cancellation,
per-item error isolation (bisecting a failed batch) and collation (stack / pad / tokenizer dicts,
optional length bucketing) are built in, and faults stay in the batch that met them
(``batch_timeout``, contained ``BaseException``, ``close(timeout=)``). See docs/batching.md.

Layout: ``_batcher`` (the public object: binding, statistics, configuration), ``_admission``
(what ``submit`` does: backpressure, the latency target, queueing), ``_forming`` (when a batch is
sealed, which items go in), ``_running`` (running ``fn``, isolating failures, giving up on a hung
call), ``_threads`` (worker threads a hung call can be abandoned by), ``_lifecycle`` (closing),
``_core`` (the state they share), ``_config`` (:class:`BatcherConfig`), ``_collate``, ``_unpad``
(cutting a padded batch's outputs per item along declared sequence dims),
``_cost_model`` (the online fits), ``_records`` (statistics and per-event records), ``_loop``
(clocks and the private loop thread), ``_decorator`` (:func:`batch`).
"""

from fastinfer.batching._batcher import DynamicBatcher
from fastinfer.batching._collate import Collator, PadCollate, PaddedBatch, StackCollate
from fastinfer.batching._config import BatcherConfig
from fastinfer.batching._decorator import BatchedFunction, batch
from fastinfer.batching._records import BatcherStatistics, BatchRecord, RequestRecord

__all__ = [
    "BatchRecord",
    "BatchedFunction",
    "BatcherConfig",
    "BatcherStatistics",
    "Collator",
    "DynamicBatcher",
    "PadCollate",
    "PaddedBatch",
    "RequestRecord",
    "StackCollate",
    "batch",
]
