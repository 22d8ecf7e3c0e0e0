"""Lazy imports of optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from fastinfer.errors import MissingDependencyError

# module name -> (pip distribution, fastinfer extra)
_EXTRAS: dict[str, tuple[str, str]] = {
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "httpx": ("httpx", "serve"),
    "aiohttp": ("aiohttp", "serve"),
    "prometheus_client": ("prometheus-client", "serve"),
    "transformers": ("transformers", "transformers"),
    "optimum": ("optimum", "transformers"),
    "safetensors": ("safetensors", "safetensors"),
    "safetensors.torch": ("safetensors", "safetensors"),
    "tqdm": ("tqdm", "safetensors"),
    "tqdm.auto": ("tqdm", "safetensors"),
    "matplotlib": ("matplotlib", "plot"),
    "matplotlib.pyplot": ("matplotlib", "plot"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxruntime.transformers": ("onnxruntime", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "openvino": ("openvino", "openvino"),
    "ray": ("ray[serve]", "ray"),
    "ray.serve": ("ray[serve]", "ray"),
}


def require(module: str, *, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist, extra = _EXTRAS.get(module, (module.split(".")[0], ""))
        what = f" ({purpose})" if purpose else ""
        fix = f"pip install 'fastinfer[{extra}]'" if extra else f"pip install {dist}"
        raise MissingDependencyError(
            f"{module!r} is needed{what} but is not installed: {fix}"
        ) from exc


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module.split(".")[0]) is not None
