"""The shared helpers: one quantile, one tolerance table, atomic writes, tables, timing."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinfer._common import files, quantiles, tables, timing, tolerances

# --------------------------------------------------------------------------------------------
# quantiles


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 101, 1000])
def test_quantile_is_numpys_linear_definition(n: int) -> None:
    rng = random.Random(n)
    xs = sorted(rng.random() for _ in range(n))
    for q in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
        assert quantiles.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)), abs=1e-15)


def test_p99_of_100_samples_is_not_the_maximum() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert quantiles.quantile(xs, 0.99) == pytest.approx(99.01)
    assert quantiles.quantile(xs, 0.99) < max(xs)


def test_summary_has_the_shared_percentiles() -> None:
    s = quantiles.summary([3.0, 1.0, 2.0])
    assert list(s) == ["count", "mean", "p50", "p90", "p99", "p999", "max"]
    assert s["count"] == 3 and s["mean"] == 2.0 and s["p50"] == 2.0 and s["max"] == 3.0
    empty = quantiles.summary([])
    assert empty["count"] == 0 and all(v == 0.0 for v in empty.values())
    assert [k for k, _ in quantiles.PERCENTILES] == ["p50", "p90", "p99", "p999"]
    assert quantiles.percentile_key(0.999) == "p999" and quantiles.percentile_key(0.5) == "p50"


def test_quantile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        quantiles.quantile_from(lambda k: 0.0, 0, 0.5)
    with pytest.raises(ValueError):
        quantiles.quantile_from(lambda k: 0.0, 3, 1.5)


def test_batcher_pool_and_histograms_read_percentiles_alike() -> None:
    """A histogram with one bucket per value reads the same p99 as the exact definition."""
    from fastinfer import MetricsRecorder

    values = [float(i) for i in range(1, 101)]
    rec = MetricsRecorder()
    h = rec.histogram("x_things", buckets=[v + 0.5 for v in values])
    for v in values:
        h.observe(v)
    s = rec.snapshot()["x_things"].get()
    assert s is not None
    # the bucket estimate of each order statistic is the midpoint of its unit-wide bucket
    exact = quantiles.quantile(values, 0.99)
    assert s.p99 == pytest.approx(exact, abs=0.5)
    assert s.p99 < 100.0


# --------------------------------------------------------------------------------------------
# tolerances


def test_one_table_in_rtol_atol_order() -> None:
    t = tolerances.tolerance_for(torch.float32)
    assert t == (t.rtol, t.atol) and t.rtol == 1e-3 and t.atol == 1e-4
    assert tolerances.tolerance_for(torch.float16) == (1e-2, 1e-2)
    assert tolerances.tolerance_for(torch.int64) == (0.0, 0.0)  # exact for integers
    assert tolerances.tolerance_for(torch.float32, atol=1.0) == (1e-3, 1.0)
    assert tolerances.tolerance_for(torch.bfloat16, rtol=0.5).rtol == 0.5


def test_compile_and_attention_verification_use_the_same_table() -> None:
    import fastinfer.attention._outputs as att
    import fastinfer.compiling._verify as comp

    assert att.tolerance_for is tolerances.tolerance_for
    assert comp.tolerance_for is tolerances.tolerance_for
    ref = [torch.ones(4)]
    near = [torch.ones(4) * (1 + 5e-4)]  # within float32's rtol of 1e-3
    far = [torch.ones(4) * 1.01]
    assert att.compare(ref, near, None)[1] == ""
    assert "differs" in att.compare(ref, far, None)[1]
    comp.check_close(near[0], ref[0], rtol=None, atol=None, where="t")
    with pytest.raises(AssertionError):
        comp.check_close(far[0], ref[0], rtol=None, atol=None, where="t")


# --------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "doc.json"
    files.atomic_write_json(target, {"a": 1})
    files.atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["doc.json"]


def test_atomic_write_cleans_up_on_error_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_path_keeps_a_suffix_and_can_refuse_to_replace(tmp_path: Path) -> None:
    target = tmp_path / "pkg.pt2"
    with files.atomic_path(target, suffix=".pt2") as tmp:
        assert tmp.suffix == ".pt2" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    with pytest.raises(FileExistsError), files.atomic_path(target, replace=False) as tmp:
        tmp.write_bytes(b"y")
    assert target.read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == ["pkg.pt2"]


# --------------------------------------------------------------------------------------------
# tables and timing


def test_render_table() -> None:
    text = tables.render_table(["name", "n"], [["a", 1], ["long name", 22]])
    assert text.splitlines() == ["name       n", "---------  --", "a          1", "long name  22"]
    right = tables.render_table(["x", "value"], [["1", "2"]], align="right")
    assert right.splitlines()[-1] == "1      2"


def test_interleaved_samples_round_robin_outside_the_setup() -> None:
    now = [0.0]
    order: list[str] = []

    def clock() -> float:
        return now[0]

    def work(name: str, cost: float) -> object:
        def run() -> None:
            order.append(name)
            now[0] += cost

        return run

    @contextlib.contextmanager
    def around(name: str) -> Iterator[None]:
        now[0] += 100.0  # setup time must not be counted
        order.append(f"+{name}")
        yield
        order.append(f"-{name}")

    fns = {"a": work("a", 1.0), "b": work("b", 3.0)}
    samples = timing.interleaved_samples(fns, rounds=2, clock=clock, around=around)  # type: ignore[arg-type]
    assert samples == {"a": [1.0, 1.0], "b": [3.0, 3.0]}
    assert order == ["+a", "a", "-a", "+b", "b", "-b"] * 2
    timing.interleaved_samples(fns, rounds=1, clock=clock, names=["b"], into=samples)  # type: ignore[arg-type]
    assert samples["b"] == [3.0, 3.0, 3.0] and timing.median(samples["b"]) == 3.0


def test_the_weights_fingerprint_counts_buffers_left_out_of_the_state_dict() -> None:
    # Was: two models equal in state_dict() but not in a non-persistent buffer (baked into an
    # ONNX export as a constant) shared one cached ONNX file: the second got the first's outputs.
    from fastinfer._common.keys import weights_fingerprint

    def model(scale: float) -> torch.nn.Module:
        m = torch.nn.Linear(4, 4)
        m.register_buffer("scale", torch.full((4,), scale), persistent=False)
        torch.nn.init.ones_(m.weight)
        torch.nn.init.zeros_(m.bias)
        return m

    a, b = model(1.0), model(2.0)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(model(1.0))
