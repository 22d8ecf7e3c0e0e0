"""``fastinfer warm``: compile a model ahead of time into a cache bundle or an AOT package.

For a Docker build step::

    fastinfer warm myapp.model:build --input 'int64[B,128]<30522' --input 'int64[B,128]=1' \\
        --batch-sizes 1,8,32 --bundle /opt/cache/bert.tar      # or: --aot /opt/bert.pt2

``--input`` gives one positional argument per flag (``name=`` in front makes it a keyword):
``DTYPE[DIMS]`` with ``B`` for the batch dimension, then optionally ``<N`` (random integers in
``[0, N)``) or ``=V`` (filled with V). Float inputs are standard normal.
"""

from __future__ import annotations

import importlib
import json
import re
import tempfile
import time
from typing import Any

import torch

from fastinfer.errors import ConfigError

_SPEC = re.compile(r"^(?:(\w+)=)?(\w+)\[([^\]]*)\](?:<(\d+)|=(-?[\d.]+))?$")


def parse_input(spec: str, batch: int, *, seed: int = 0) -> tuple[str | None, torch.Tensor]:
    """``"float32[B,32]"`` -> (None, a (batch, 32) tensor); ``"mask=int64[B,8]=1"`` -> keyword."""
    m = _SPEC.match(spec.replace(" ", ""))
    if not m:
        raise ConfigError(
            f"bad --input {spec!r}: expected DTYPE[DIMS] with B as the batch dimension, e.g. "
            "'float32[B,32]', 'int64[B,128]<30522' or 'attention_mask=int64[B,128]=1'"
        )
    name, dtype_name, dims, high, fill = m.groups()
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"bad --input {spec!r}: {dtype_name!r} is not a torch dtype")
    shape: list[int] = []
    for d in filter(None, dims.split(",")):
        if d == "B":
            shape.append(batch)
        elif d.isdigit():
            shape.append(int(d))
        else:
            raise ConfigError(f"bad --input {spec!r}: dimension {d!r} is not B or an integer")
    gen = torch.Generator().manual_seed(seed)
    if fill is not None:
        t = torch.full(shape, float(fill), dtype=dtype)
    elif dtype.is_floating_point:
        t = torch.randn(shape, generator=gen).to(dtype)
    else:
        t = torch.randint(1 if high is None else 0, int(high or 100), shape, generator=gen)
        t = t.to(dtype)
    return name, t


def load_factory(target: str) -> Any:
    """``"package.module:factory"`` -> the model (factory called with no arguments, in eval mode)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model must be 'module:factory', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {target!r}: {exc}") from exc
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{target!r} gave a {type(model).__name__}, not an nn.Module")
    return model.eval()


def run_warm(args: Any) -> int:
    from fastinfer._common.files import writable_target
    from fastinfer.compiling import InductorCache, compile_model, export_aot

    if bool(args.bundle) == bool(args.aot):
        raise ConfigError("give exactly one of --bundle PATH or --aot PATH")
    # An unwritable destination fails now, not after minutes of compiling.
    if args.bundle:
        writable_target(args.bundle, what="cache bundle (--bundle)", example="model.tar")
    else:
        writable_target(args.aot, what="AOT package (--aot)", example="model.pt2")
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError as exc:
        raise ConfigError(f"--batch-sizes must be integers like 1,8,32: {exc}") from exc
    model = load_factory(args.model)
    pos: list[torch.Tensor] = []
    kw: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(args.input or []):
        name, t = parse_input(spec, max(sizes), seed=i)
        if name:
            kw[name] = t
        else:
            pos.append(t)
    if not pos and not kw:
        raise ConfigError("give at least one --input, e.g. --input 'float32[B,32]'")
    example: Any = kw if not pos else tuple(pos)
    if pos and kw:
        raise ConfigError("use either positional or keyword --input specs, not both")
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"model": args.model, "batch_sizes": list(sizes)}
    if args.aot:
        path = export_aot(model, example, args.aot, batch_sizes=sizes)
        summary.update(aot=str(path), size_bytes=path.stat().st_size)
    else:
        with tempfile.TemporaryDirectory(prefix="fastinfer-warm-") as tmp:
            with InductorCache(args.cache_dir or tmp, tag=args.tag) as cache:
                compiled = compile_model(
                    model,
                    example,
                    backend=args.backend,
                    mode=args.mode,
                    batch_sizes=sizes,
                    cache=cache,
                )
                path = cache.export(args.bundle)
            st = compiled.statistics()
            summary.update(
                bundle=str(path),
                size_bytes=path.stat().st_size,
                graphs=st.graphs,
                cache_hits=st.cache_hits,
                cache_misses=st.cache_misses,
            )
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(summary))
    return 0


def add_parser(sub: Any) -> None:
    warm = sub.add_parser(
        "warm",
        help="compile a model into a cache bundle or an AOT package (for a Docker build step)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    warm.add_argument("model", help="import path of a model or a factory: package.module:name")
    warm.add_argument(
        "--input", action="append", metavar="SPEC", help="example input, e.g. 'float32[B,32]'"
    )
    warm.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    warm.add_argument("--bundle", metavar="PATH", help="write an InductorCache bundle (tar)")
    warm.add_argument("--aot", metavar="PATH", help="write an AOTInductor .pt2 package")
    warm.add_argument("--cache-dir", help="compile into this folder (default: a temporary one)")
    warm.add_argument("--tag", help="tag recorded in the cache manifest")
    warm.add_argument("--backend", default="inductor")
    warm.add_argument("--mode", default=None)
