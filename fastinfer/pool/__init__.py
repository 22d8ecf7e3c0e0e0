"""Core pinning: a topology-aware plan, thread configuration and a pinned worker-process pool.

- :class:`CorePlan` reads the CPUs this process may use (affinity, cpuset), their physical cores,
  SMT siblings, sockets and NUMA nodes from sysfs, and the cgroup CPU quota; ``plan.split(n)``
  gives ``n`` workers disjoint physical cores and a thread count each.
- :func:`configure_threads` sets torch's intra/inter-op threads and OMP/MKL variables together
  for the single-process case.
- :class:`PinnedPool` runs ``fn(state, item)`` in worker processes that pin themselves *before*
  importing torch, share tensors through shared memory, survive crashes and hangs, and never
  outlive the parent.

::

    with PinnedPool(load_model, predict, workers=2) as pool:
        y = pool.submit(x).result()          # or: y = await pool.run(x)

See docs/pool.md. Layout: ``_pool`` (the public object), ``_supervisor`` (the pool's thread:
workers' lifecycle), ``_state`` (what that thread holds instead of the pool, the finalizer of a
pool dropped unclosed, the calls' Futures), ``_worker`` (the worker process's entry point, run
by path), ``_wire`` (what travels between them: a leaf both import), ``_plan`` / ``_topology``
(cores and sysfs), ``_threads`` (:func:`configure_threads`), ``_records`` (statistics and
per-call records).
"""

from fastinfer.pool._plan import Core, CorePlan, Split, WorkerCores
from fastinfer.pool._pool import PinnedPool
from fastinfer.pool._records import CallRecord, PoolStatistics, WorkerStatistics
from fastinfer.pool._threads import ThreadSettings, configure_threads
from fastinfer.pool._topology import parse_cpulist
from fastinfer.pool._wire import worker_state

__all__ = [
    "CallRecord",
    "Core",
    "CorePlan",
    "PinnedPool",
    "PoolStatistics",
    "Split",
    "ThreadSettings",
    "WorkerCores",
    "WorkerStatistics",
    "configure_threads",
    "parse_cpulist",
    "worker_state",
]
