"""Integrations of fastinfer with serving stacks; each submodule imports its own extra lazily.

- ``fastinfer.integrations.fastapi``: lifespan, readiness, error mapping, cancel-on-disconnect,
  ``/metrics`` for a FastAPI app (extra: ``serve``); its private helpers: ``_limits`` (body size,
  slow clients, shedding at the door: ASGI middleware), ``_admission`` (a queue sized from the
  measured batch cost), ``_dashboard`` (the live page's data) and ``_dashboard_page`` (the page);
- ``fastinfer.integrations.ray``: fastinfer's batcher, compile-cache bundles, thread sizing and
  merged metrics inside Ray Serve replicas (extra: ``ray``).
"""
