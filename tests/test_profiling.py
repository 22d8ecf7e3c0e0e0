"""fastinfer.profile: trace written, summary right on tiny models, env-var switch, maybe_profile."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import ConfigError, profiling
from fastinfer.testing import tiny_mlp


class _ManyTinyOps(nn.Module):
    """80 elementwise ops on a 4x4 tensor: dispatch overhead dominates (launch-bound)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(40):
            x = torch.relu(x + 1.0)
        return x


@pytest.fixture(autouse=True)
def _fresh_windows() -> Iterator[None]:
    profiling.reset_windows()
    yield
    profiling.reset_windows()


def test_profile_summary_on_a_tiny_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, x = tiny_mlp(), torch.randn(4, 32)
    with torch.inference_mode(), fastinfer.profile(steps=5, trace_dir=tmp_path) as prof:
        for _ in range(5):
            model(x)
    s = prof.summary
    assert s is not None and s.steps == 5 and s.device == "cpu"
    names = [o.name for o in s.top_ops]
    assert "aten::addmm" in names  # the three Linear layers
    addmm = next(o for o in s.top_ops if o.name == "aten::addmm")
    assert addmm.calls == 3 * 5
    assert s.op_calls_per_step == s.op_calls / 5 and s.op_calls_per_step >= 5
    assert 0.0 <= s.tiny_op_share <= 1.0
    assert abs(sum(o.share for o in s.top_ops) - 1.0) < 1e-6 or len(s.top_ops) == 10
    assert s.trace_path is not None and Path(s.trace_path).parent == tmp_path
    trace = json.loads(Path(s.trace_path).read_text())
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    out = capsys.readouterr().out
    assert "fastinfer.profile: 5 step(s)" in out and "aten::addmm" in out and "trace:" in out


def test_launch_bound_hint_for_many_tiny_ops(tmp_path: Path) -> None:
    model, x = _ManyTinyOps(), torch.randn(4, 4)
    with fastinfer.profile(steps=3, trace_dir=False, tiny_op_us=1000, print_summary=False) as prof:
        for _ in range(3):
            model(x)
    s = prof.summary
    assert s is not None and s.trace_path is None
    assert s.op_calls_per_step >= 80
    assert s.launch_bound and s.hint is not None and "compile_model" in s.hint
    assert "many small kernels" in str(s)


def test_no_hint_for_few_large_ops() -> None:
    a = torch.randn(256, 512)
    b = torch.randn(512, 512)
    with fastinfer.profile(steps=2, trace_dir=False, print_summary=False) as prof:
        for _ in range(2):
            a @ b
    s = prof.summary
    assert s is not None and not s.launch_bound and s.hint is None


def test_env_var_turns_explicit_blocks_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTINFER_PROFILE", "0")
    with fastinfer.profile(trace_dir=False) as prof:
        torch.ones(3).sum()
    assert prof.summary is None
    with pytest.raises(ConfigError, match="steps"):
        fastinfer.profile(steps=0)


def test_maybe_profile_is_a_no_op_unless_the_env_var_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, x = tiny_mlp(), torch.randn(2, 32)
    monkeypatch.delenv("FASTINFER_PROFILE", raising=False)
    for _ in range(6):
        with profiling.maybe_profile("svc", warmup=1, steps=3):
            model(x)
    assert profiling.last_window_summary("svc") is None
    monkeypatch.setenv("FASTINFER_PROFILE", "1")
    monkeypatch.setenv("FASTINFER_PROFILE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fastinfer.profiling"):
        for i in range(8):
            with profiling.maybe_profile("svc", warmup=2, steps=3):
                model(x)
            if i < 4:
                assert profiling.last_window_summary("svc") is None
    s = profiling.last_window_summary("svc")
    assert s is not None and s.steps == 3
    addmm = next(o for o in s.top_ops if o.name == "aten::addmm")
    assert addmm.calls == 3 * 3  # exactly the 3 calls of the window
    assert s.trace_path is not None and Path(s.trace_path).parent == tmp_path
    assert len(list(tmp_path.glob("svc-*.json"))) == 1  # one window, one trace
    assert "window 'svc' finished" in caplog.text


def test_maybe_profile_never_breaks_the_service(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: profiling.Profile) -> profiling.Profile:
        raise RuntimeError("profiler already running")

    monkeypatch.setattr(profiling.Profile, "__enter__", broken)
    monkeypatch.setenv("FASTINFER_PROFILE", "1")
    results = []
    with caplog.at_level(logging.ERROR, logger="fastinfer.profiling"):
        for i in range(4):
            with profiling.maybe_profile("svc", warmup=0, steps=2):
                results.append(i)
    assert results == [0, 1, 2, 3]
    assert "could not start the profiler" in caplog.text
    assert profiling.last_window_summary("svc") is None
