"""The shared benchmark harness computes medians, spreads and ratios correctly."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _harness as h


class FakeClock:
    """A clock that each timed callable advances by a scripted amount."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advancer(self, durations: list[float]):  # type: ignore[no-untyped-def]
        it = iter(durations)

        def fn() -> None:
            self.now += next(it)

        return fn


def test_summarize_median_quartiles_and_spread() -> None:
    st = h.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (st.n, st.median, st.mean, st.minimum, st.maximum) == (5, 3.0, 3.0, 1.0, 5.0)
    assert (st.q1, st.q3) == (2.0, 4.0)
    assert st.spread == pytest.approx(2.0 / 3.0)
    assert h.summarize([1.0, 2.0, 3.0, 4.0]).median == 2.5


def test_summarize_rejects_empty() -> None:
    with pytest.raises(ValueError):
        h.summarize([])


def test_compare_interleaves_warms_up_and_computes_ratios() -> None:
    clock = FakeClock()
    # 2 warm-up calls (not timed, so their duration must not count) then 5 timed trials each.
    base = clock.advancer([100.0, 100.0, 4.0, 4.0, 4.0, 4.0, 40.0])
    fast = clock.advancer([100.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    order: list[str] = []
    variants = {
        "base": lambda: (order.append("b"), base()),
        "fast": lambda: (order.append("f"), fast()),
    }
    res = h.compare(variants, baseline="base", warmup=2, repeat=5, clock=clock)
    assert res.stats["base"].median == 4.0  # the 40 s outlier does not move the median
    assert res.stats["fast"].median == 1.0
    assert res.ratio("fast") == 4.0
    assert order[4:] == ["b", "f"] * 5  # timed trials alternate between variants


def test_compare_number_divides_per_call() -> None:
    clock = FakeClock()
    fn = clock.advancer([2.0] * 12)
    st = h.measure(fn, warmup=0, repeat=3, number=4, clock=clock)
    assert st.median == 2.0 and st.n == 3


def test_compare_runs_sync_before_each_clock_read() -> None:
    calls: list[str] = []
    h.compare(
        {"a": lambda: calls.append("fn")},
        baseline="a",
        warmup=0,
        repeat=2,
        sync=lambda: calls.append("sync"),
    )
    assert calls == ["sync", "fn", "sync"] * 2


def test_compare_rejects_unknown_baseline() -> None:
    with pytest.raises(ValueError, match="baseline"):
        h.compare({"a": lambda: None}, baseline="b")


def test_bench_table_targets_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    res = h.compare(
        {"naive": clock.advancer([3.0] * 3), "fast": clock.advancer([1.0] * 3)},
        baseline="naive",
        warmup=0,
        repeat=3,
        clock=clock,
    )
    out = tmp_path / "r.json"
    bench = h.Bench("demo", description="d", argv=["--json", str(out)])
    bench.add(res, case="c", target=("fast", ">=", 2.5))
    bench.add_value("c", "p99", 0.02, unit="s", target=("<=", 0.05))
    bench.add_value("c", "too-slow", 1.0, ratio=1.1, target=(">=", 2.0))
    doc = bench.finish()
    printed = capsys.readouterr().out
    assert "3.00x" in printed and "machine:" in printed
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fast"]["ratio"] == 3.0 and rows["fast"]["ok"] is True
    assert rows["naive"]["ratio"] is None
    assert rows["p99"]["ok"] is True and rows["too-slow"]["ok"] is False
    assert doc["machine"]["torch"]
