"""Profiling, environment flags and Prometheus names under faults: nested or concurrent profile
blocks never crash the process, a trace that cannot be written keeps the summary, a typo in a
boolean variable is an error, and a metric name another collector exposes is refused."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_python

import fastinfer
from fastinfer import ConfigError, MetricNameError, MetricsRecorder, _env, profiling
from fastinfer.testing import tiny_mlp

# --------------------------------------------------------- one profile block at a time (bug 1)
# A second torch profiler session crashes the process (SIGSEGV), so these run in a subprocess:
# a regression fails the test instead of killing pytest.


def _run(code: str) -> dict[str, Any]:
    proc = run_python(textwrap.dedent(code), timeout=240, check=False)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), stderr=proc.stderr)


def test_a_nested_profile_block_is_a_no_op_recorded_in_the_outer(tmp_path: Path) -> None:
    got = _run(f"""
        import json, torch, fastinfer
        from fastinfer.testing import tiny_mlp
        m, x = tiny_mlp(), torch.randn(4, 32)
        with fastinfer.profile(name="outer", trace_dir={str(tmp_path)!r}, print_summary=False) as outer:
            for _ in range(2):
                with fastinfer.profile(name="inner", print_summary=False) as inner:
                    m(x)
        trace = json.load(open(outer.summary.trace_path))
        print(json.dumps({{
            "inner_summary": inner.summary is not None, "skipped": inner.skipped,
            "outer_ops": [o.name for o in outer.summary.top_ops],
            "ranges": sum(e.get("name") == "inner" for e in trace["traceEvents"]),
        }}))
    """)
    assert (
        not got["inner_summary"] and "nested in the running profile block 'outer'" in got["skipped"]
    )
    assert "aten::addmm" in got["outer_ops"] and "inner" not in got["outer_ops"]
    assert got["ranges"] == 2  # the inner blocks are ranges in the outer trace
    assert got["stderr"].count("took no profile of its own") == 1  # logged once per outer block


def test_a_profile_block_inside_a_torch_profiler_is_a_no_op() -> None:
    got = _run("""
        import json, torch, fastinfer
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU]) as tp:
            with fastinfer.profile(name="mine", trace_dir=False, print_summary=False) as p:
                torch.ones(3).relu()
        print(json.dumps({"summary": p.summary is not None, "skipped": p.skipped,
                          "seen": any(e.key == "aten::relu" for e in tp.key_averages())}))
    """)
    assert not got["summary"] and "torch.profiler session" in got["skipped"] and got["seen"]


def test_a_profile_block_while_another_thread_profiles_is_refused() -> None:
    got = _run("""
        import json, threading, torch, fastinfer
        started, release = threading.Event(), threading.Event()
        out = {}
        def other():
            with fastinfer.profile(name="worker", trace_dir=False, print_summary=False) as p:
                started.set()
                release.wait(60)
                torch.ones(3).relu()
            out["worker"] = p.summary is not None
        t = threading.Thread(target=other, name="profiling-thread")
        t.start()
        assert started.wait(60)
        try:
            with fastinfer.profile(name="main", trace_dir=False, print_summary=False):
                pass
        except fastinfer.ConfigError as e:
            out["error"] = str(e)
        release.set()
        t.join(60)
        with fastinfer.profile(name="after", trace_dir=False, print_summary=False) as p:
            torch.ones(3).relu()
        out["after"] = p.summary is not None
        print(json.dumps(out))
    """)
    assert "'worker' is running in thread 'profiling-thread'" in got["error"]
    assert "one block at a time" in got["error"]
    assert got["worker"] and got["after"]  # the running block and a later one are unharmed


def test_entering_the_same_profile_twice_is_refused() -> None:
    got = _run("""
        import json, torch, fastinfer
        p = fastinfer.profile(trace_dir=False, print_summary=False)
        with p:
            try:
                with p:
                    pass
            except fastinfer.ConfigError as e:
                err = str(e)
            torch.ones(2).relu()
        print(json.dumps({"err": err, "summary": p.summary is not None}))
    """)
    assert "already running" in got["err"] and got["summary"]


# ----------------------------------------------------------- a trace that cannot be written (bug 2)


def _profile(folder: object, **kw: Any) -> fastinfer.profiling.Profile:
    m, x = tiny_mlp(), torch.randn(4, 32)
    with fastinfer.profile(trace_dir=folder, print_summary=False, **kw) as p:  # type: ignore[arg-type]
        m(x)
    return p


def _fake_export(write: bytes | None, suffix: str = "") -> Any:
    def export(self: Any, path: str, *a: Any, **k: Any) -> None:
        if write is not None:
            Path(path + suffix).write_bytes(write)

    return export


@pytest.mark.parametrize(
    ("write", "suffix"),
    [(b'{"traceEvents": [', ".tmp"), (b'{"traceEvents": [{"name": "aten::a', ""), (None, "")],
    ids=["full-disk-temp-file-left", "truncated", "nothing-written"],
)
def test_a_trace_torch_could_not_write_whole_keeps_the_summary_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    write: bytes | None,
    suffix: str,
) -> None:
    # torch's exporter fails silently on a full disk: <path>.tmp left, no trace (seen on tmpfs)
    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", _fake_export(write, suffix))
    with caplog.at_level(logging.WARNING, logger="fastinfer.profiling"):
        p = _profile(tmp_path)
    s = p.summary
    assert s is not None and s.trace_path is None and s.op_calls > 0
    assert s.trace_error is not None and "is the disk full?" in s.trace_error
    assert "trace: not written" in str(s)
    assert list(tmp_path.iterdir()) == []
    assert str(tmp_path) in caplog.text and "FASTINFER_PROFILE_DIR" in caplog.text


def test_a_trace_folder_that_is_a_file_keeps_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("FASTINFER_PROFILE_DIR", str(afile))
    with caplog.at_level(logging.WARNING, logger="fastinfer.profiling"):
        p = _profile(None)
    assert p.summary is not None and p.summary.trace_path is None
    assert p.summary.trace_error is not None and "FileExistsError" in p.summary.trace_error
    assert f"could not write the trace to folder {afile}" in caplog.text
    assert "FASTINFER_PROFILE_DIR" in caplog.text and "trace_dir" in caplog.text
    assert afile.read_text() == "x"


def test_an_unwritable_trace_folder_keeps_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(self: Any, path: str, *a: Any, **k: Any) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", denied)
    p = _profile(tmp_path / "sub")
    assert p.summary is not None and p.summary.trace_path is None
    assert p.summary.trace_error is not None and "PermissionError" in p.summary.trace_error


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_trace_folder_keeps_the_summary(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        p = _profile(ro / "traces")
    finally:
        ro.chmod(0o700)
    assert p.summary is not None and p.summary.trace_path is None and p.summary.trace_error


def test_an_error_in_the_block_still_propagates_when_the_trace_folder_is_bad(
    tmp_path: Path,
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with (
        pytest.raises(KeyError, match="from the block"),
        fastinfer.profile(trace_dir=afile, print_summary=False) as p,
    ):
        raise KeyError("from the block")
    assert p.summary is None
    with fastinfer.profile(trace_dir=False, print_summary=False) as p:  # the session was closed
        torch.ones(2).relu()
    assert p.summary is not None


# ------------------------------------------------------------- boolean environment flags (bug 3)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True), ("TRUE", True), (" on ", True), ("Yes", True),
        ("0", False), ("false", False), ("OFF", False), ("no", False),
        ("", None), ("  ", None),
    ],
)  # fmt: skip
def test_boolean_flags_accept_the_documented_values(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool | None
) -> None:
    monkeypatch.setenv("FASTINFER_PROGRESS", value)
    assert _env.flag("FASTINFER_PROGRESS") is expected


@pytest.mark.parametrize("value", ["2", "maybe", "disabled", "ture"])
def test_a_typo_in_fastinfer_profile_is_an_error_not_off(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FASTINFER_PROFILE", value)
    with pytest.raises(ConfigError) as e:
        fastinfer.profile(trace_dir=False)
    msg = str(e.value)
    assert f"FASTINFER_PROFILE={value!r}" in msg and "1, true, yes, on" in msg
    assert "0, false, no, off" in msg
    with fastinfer.profile(
        trace_dir=False, enabled=True, print_summary=False
    ) as p:  # explicit wins
        torch.ones(2).relu()
    assert p.summary is not None


def test_a_typo_in_fastinfer_progress_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTINFER_PROGRESS", "2")
    with pytest.raises(ConfigError, match="FASTINFER_PROGRESS='2' is not a boolean"):
        _env.progress_wanted()
    assert _env.progress_wanted(False) is False  # an explicit argument does not read it


def test_maybe_profile_logs_a_typo_once_and_serves_unprofiled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    profiling.reset_windows()
    monkeypatch.setenv("FASTINFER_PROFILE", "yes please")
    with caplog.at_level(logging.ERROR, logger="fastinfer.profiling"):
        for _ in range(5):
            with profiling.maybe_profile("typo", warmup=0, steps=2):
                torch.ones(2).relu()
    assert caplog.text.count("FASTINFER_PROFILE='yes please' is not a boolean") == 1
    assert profiling.last_window_summary("typo") is None
    profiling.reset_windows()


def test_a_bad_flag_is_not_read_at_import() -> None:
    proc = run_python(
        "import fastinfer, fastinfer.profiling; print('ok')",
        env={"FASTINFER_PROFILE": "maybe", "FASTINFER_PROGRESS": "2"},
    )
    assert proc.stdout.strip() == "ok"


# ------------------------------------------------------------------ Prometheus name clashes (bug 4)


def _lines(registry: Any, name: str) -> list[str]:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name]


@pytest.mark.serve
def test_registering_over_the_default_collectors_names_is_refused() -> None:
    from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=True)  # what prometheus_client.REGISTRY is
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    rec = MetricsRecorder()
    rec.counter("process_cpu_seconds_total").inc(5)
    rec.gauge("app_ok").set(1)
    with pytest.raises(MetricNameError) as e:
        rec.register(registry)
    assert "'process_cpu_seconds_total'" in str(e.value) and "rename" in str(e.value)
    assert "app_ok" not in str(e.value)
    assert len(_lines(registry, "process_cpu_seconds_total")) == 1  # nothing was registered
    assert _lines(registry, "app_ok") == []


@pytest.mark.serve
def test_registering_over_a_prometheus_client_metric_is_refused() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("app_jobs", "jobs", registry=registry).inc()
    rec = MetricsRecorder()
    rec.counter("app_jobs_total").inc(3)
    with pytest.raises(MetricNameError, match="'app_jobs_total'"):
        rec.register(registry)
    assert _lines(registry, "app_jobs_total") == ["app_jobs_total 1.0"]


@pytest.mark.serve
def test_a_metric_created_after_register_is_checked_against_the_registry() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("app_jobs", "jobs", registry=registry).inc()
    rec = MetricsRecorder()
    rec.register(registry)
    with pytest.raises(MetricNameError) as e:
        rec.counter("app_jobs_total")
    assert "'app_jobs_total' would expose" in str(e.value) and "prometheus_client" in str(e.value)
    assert "app_jobs_total" not in rec  # not created
    assert _lines(registry, "app_jobs_total") == ["app_jobs_total 1.0"]
    rec.counter("app_other_total").inc(2)  # a name nobody else has is fine, and exported
    assert _lines(registry, "app_other_total") == ["app_other_total 2.0"]


@pytest.mark.serve
def test_a_prometheus_client_metric_registered_later_cannot_take_a_recorder_name() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    rec = MetricsRecorder()
    rec.register(registry)
    rec.counter("app_late_total").inc()  # created after register(): its names are held too
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("app_late", "clash", registry=registry)
    assert _lines(registry, "app_late_total") == ["app_late_total 1.0"]


@pytest.mark.serve
def test_after_unregister_the_registry_is_left_alone() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    rec = MetricsRecorder()
    collector = rec.register(registry)
    registry.unregister(collector)
    rec.counter("app_free_total").inc()
    Counter("app_free", "now theirs", registry=registry)  # not held by the recorder any more
    assert rec._registrations == []


@pytest.mark.serve
def test_a_merged_worker_metric_that_clashes_is_refused_whole() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("app_jobs", "jobs", registry=registry)
    parent = MetricsRecorder()
    parent.register(registry)
    worker = MetricsRecorder()
    worker.counter("app_fine_total").inc()
    worker.counter("app_jobs_total").inc()
    with pytest.raises(MetricNameError, match="app_jobs_total"):
        parent.merge(worker.collect_delta(), worker="0")
    assert parent.names() == [] and parent.statistics().deltas_refused == 1


def test_registering_a_recorder_twice_into_one_registry_is_a_no_op() -> None:
    # Was: a MetricNameError blaming "another collector" (the recorder itself).
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    rec = fastinfer.MetricsRecorder()
    rec.counter("jobs_total").inc()
    first = rec.register(registry)
    assert rec.register(registry) is first
    assert "jobs_total 1.0" in prometheus_client.generate_latest(registry).decode()
    registry.unregister(first)
    assert rec.register(registry) is not first  # registered again after an unregister
