"""Integrations of fastinfer with serving stacks; each submodule imports its own extra lazily.

- ``fastinfer.integrations.fastapi``: lifespan, readiness, error mapping, cancel-on-disconnect,
  ``/metrics`` for a FastAPI app (extra: ``serve``);
- ``fastinfer.integrations.ray``: fastinfer's batcher, compile-cache bundles, thread sizing and
  merged metrics inside Ray Serve replicas (extra: ``ray``).
"""
