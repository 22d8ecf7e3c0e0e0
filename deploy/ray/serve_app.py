"""A Ray Serve application running fastinfer in every replica, for ``serve run`` / ``serve deploy``.

    serve run deploy/ray/config.yaml          # from the repository root

Each replica sizes its threads to its ``num_cpus``, imports the compile-cache bundle (a path every
node can read: baked into the cluster's image, or on a shared volume), compiles from it with no
compile, and batches with fastinfer's work-conserving ``DynamicBatcher``. The second application
serves every replica's merged metrics to Prometheus at ``/fastinfer-metrics``.

Application arguments (``args:`` in the config): ``model`` (``module:factory``), ``input``
(a ``fastinfer warm`` spec such as ``float32[B,32]``), ``batch_sizes`` (e.g. ``"1,8,32"``),
``bundle`` (path or null to compile cold), ``max_wait_ms``.
"""

from __future__ import annotations

from typing import Any

import torch
from ray import serve

from fastinfer._cli.warm import load_factory, parse_input
from fastinfer.errors import ConfigError, InvalidInput, QueueFull
from fastinfer.integrations.ray import FastInferReplica, metrics_app


@serve.deployment(name="FastInferModel", max_ongoing_requests=256)
class FastInferModel:
    def __init__(
        self, model: str, input: str, batch_sizes: str, bundle: str | None, max_wait_ms: float
    ) -> None:
        sizes = tuple(int(s) for s in batch_sizes.split(","))
        name, example = parse_input(input, max(sizes))
        if name is not None:
            raise ConfigError(f"input must be one positional spec, got {input!r}")
        self.fi = FastInferReplica(name=model, bundle=bundle)  # threads first, then the import
        compiled = self.fi.compile(load_factory(model), example, batch_sizes=sizes)
        self.shape, self.dtype = tuple(example.shape[1:]), example.dtype

        def run(batch: torch.Tensor) -> torch.Tensor:  # (B, *shape) -> (B, ...)
            return compiled(batch)

        self.batcher = self.fi.batcher(
            run, max_batch_size=max(sizes), max_wait_ms=max_wait_ms, collate="stack"
        )

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            x = torch.tensor((await request.json())["x"], dtype=self.dtype)
            if tuple(x.shape) != self.shape:
                raise InvalidInput(f"x has shape {tuple(x.shape)}, expected {self.shape}")
            return {"y": (await self.batcher.submit(x)).tolist()}
        except (InvalidInput, KeyError, TypeError, ValueError) as exc:
            return JSONResponse({"error": "invalid_input", "detail": str(exc)}, status_code=422)
        except QueueFull as exc:
            return JSONResponse(
                {"error": "queue_full", "detail": str(exc)},
                status_code=503,
                headers={"Retry-After": str(max(1, round(exc.retry_after or 1)))},
            )

    def __del__(self) -> None:  # Serve's shutdown hook
        self.fi.close()


def build_app(args: dict[str, Any]) -> Any:
    """The model application (``import_path: serve_app:build_app``)."""
    return FastInferModel.bind(  # type: ignore[attr-defined]
        str(args.get("model", "fastinfer.testing:tiny_mlp")),
        str(args.get("input", "float32[B,32]")),
        str(args.get("batch_sizes", "1,8,32")),
        args.get("bundle"),
        float(args.get("max_wait_ms", 5)),
    )


def build_metrics(args: dict[str, Any]) -> Any:
    """The merged-metrics application (``import_path: serve_app:build_metrics``)."""
    return metrics_app(openmetrics=bool(args.get("openmetrics", False)))
