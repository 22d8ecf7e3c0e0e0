"""Lifecycle faults of a FastInferService (outside probe, on 4d675f1), in-process lifespans.

Each test reproduces one fault and asserts the fix:

- a managed object whose ``close()`` hangs held the shutdown (and the process) up for good;
- an ``aclose()`` that raised ``CancelledError`` (``task.cancel(); await task``) stopped every
  later close and failed the shutdown;
- the drain took ``shutdown_timeout_seconds`` per object (``serve_model`` manages two: 60 s by
  default, past Kubernetes' 30 s grace), each timeout logged as a chained traceback;
- a second lifespan overlapping a running one failed with a misleading metrics ``ConfigError``
  and closed the running lifespan's batcher (the server answered 503 ``setup_failed`` for good);
- two services installed on one app answered each other's errors (the last install won);
- ``svc.manage`` held the service's lock while calling ``statistics()``: one that asked
  ``svc.readiness()`` deadlocked.

A hang becomes a failure: each lifespan runs in a daemon thread joined with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.serve
pytest.importorskip("fastapi")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import fastinfer  # noqa: E402
from fastinfer._common.export import gauge  # noqa: E402
from fastinfer.errors import ConfigError  # noqa: E402
from fastinfer.integrations.fastapi import FastInferService  # noqa: E402

LOGGER = "fastinfer.integrations.fastapi"


def run_within(seconds: float, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """``asyncio.run(main())`` in a daemon thread: one still running after ``seconds`` fails."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:  # CancelledError included: re-raised below
            box["error"] = exc

    thread = threading.Thread(target=target, name="test-lifespan", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the lifespan still runs after {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def double(xs: list[int]) -> list[int]:
    return [x * 2 for x in xs]


def service(*objects: tuple[str, Any], **kw: Any) -> tuple[FastAPI, FastInferService]:
    """A service whose setup manages ``objects`` (closed in reverse order) after a batcher."""
    svc = FastInferService(background_setup=False, freeze_gc=False, **kw)

    @svc.setup
    def build(svc: FastInferService) -> None:
        batcher = fastinfer.DynamicBatcher(double, max_batch_size=4, max_wait_ms=1)
        svc.state.batcher = svc.manage(batcher, name="batcher")
        for name, obj in objects:
            svc.manage(obj, name=name)

    return FastAPI(lifespan=svc.lifespan), svc


class Closes:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def close(self) -> None:
        self.log.append(self.name)


def lines_about(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith(name)]


def test_a_close_that_hangs_is_given_up_at_the_deadline_and_the_others_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastinfer")
    release, closed = threading.Event(), []

    class HangsInClose:
        def close(self) -> None:
            closed.append(f"hangs (daemon thread: {threading.current_thread().daemon})")
            release.wait(60)

    app, svc = service(
        ("first", Closes(closed, "first")),
        ("hangs", HangsInClose()),
        shutdown_timeout_seconds=0.5,
    )

    async def main() -> float:
        async with svc.lifespan(app):
            batcher = svc.state.batcher
            assert await batcher.submit(2) == 4
            t0 = time.monotonic()
        assert batcher.closed
        return time.monotonic() - t0

    try:
        took = run_within(10, main)
    finally:
        release.set()
    # closed in reverse order: the hung one given up at the deadline, the others still closed
    assert closed == ["hangs (daemon thread: True)", "first"]
    assert took < 0.5 + 2, took
    (line,) = lines_about(caplog, "hangs")
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "did not drain within 0.5 s" in line.getMessage()
    assert "daemon thread" in line.getMessage()


class RaisesCancelled:
    """``aclose()`` in the common pattern: cancel a task of its own and await it, unsuppressed."""

    async def aclose(self) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        await task


def test_an_aclose_raising_cancelled_error_does_not_stop_the_other_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastinfer")
    closed: list[str] = []
    app, svc = service(("first", Closes(closed, "first")), ("cancels", RaisesCancelled()))

    async def main() -> Any:
        async with svc.lifespan(app):
            batcher = svc.state.batcher
        return batcher

    batcher = run_within(10, main)  # was: CancelledError out of the lifespan's shutdown
    assert closed == ["first"] and batcher.closed
    (line,) = [r for r in caplog.records if "closing cancels" in r.getMessage()]
    assert "CancelledError" in line.getMessage() and line.exc_info is None


def test_the_shutdown_itself_cancelled_still_propagates() -> None:
    started, closed = threading.Event(), []

    class HangsInAclose:
        async def aclose(self) -> None:
            started.set()
            await asyncio.sleep(3600)

    app, svc = service(("first", Closes(closed, "first")), ("hangs", HangsInAclose()))

    async def main() -> bool:
        async def lifespan() -> None:
            async with svc.lifespan(app):
                pass

        task = asyncio.create_task(lifespan())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the server giving up on the shutdown
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert run_within(10, main)
    assert closed == []  # cancelled at the first close: the rest is the server's to give up


class HangsInAcloseUntilCancelled:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    async def aclose(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.log.append(self.name)
            raise


def test_the_drain_deadline_is_shared_by_the_objects_and_logged_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastinfer")
    cancelled: list[str] = []
    hung = [(f"hung{i}", HangsInAcloseUntilCancelled(cancelled, f"hung{i}")) for i in range(3)]
    app, svc = service(*hung, shutdown_timeout_seconds=1.0)

    async def main() -> float:
        async with svc.lifespan(app):
            batcher = svc.state.batcher
            t0 = time.monotonic()
        assert batcher.closed  # closed last, after the deadline
        return time.monotonic() - t0

    took = run_within(15, main)
    # was: 1 s per object (3 s here; serve_model's two objects took 60 s by default)
    assert took < 2.0, took
    assert cancelled == ["hung2", "hung1", "hung0"]
    for name in ("hung0", "hung1", "hung2"):
        (line,) = lines_about(caplog, name)  # was: a ~20-line chained traceback each
        assert line.levelno == logging.WARNING and line.exc_info is None
        assert line.getMessage().startswith(f"{name} did not drain within 1 s")
        assert "\n" not in line.getMessage()


def test_a_lifespan_overlapping_a_running_one_is_refused_and_leaves_it_serving() -> None:
    app, svc = service()

    async def main() -> None:
        async with svc.lifespan(app):
            batcher = svc.state.batcher
            with pytest.raises(ConfigError, match="lifespan is already running") as refused:
                async with svc.lifespan(app):
                    pass
            assert "app factory" in str(refused.value)
            # the running lifespan is intact: was 503 setup_failed, its batcher closed
            assert not batcher.closed and svc.ready and svc.readiness()["ready"]
            assert await batcher.submit(3) == 6
        assert batcher.closed
        async with svc.lifespan(app):  # a lifespan after the first ended: starts afresh
            assert svc.state.batcher is not batcher
            assert await svc.state.batcher.submit(4) == 8

    run_within(10, main)


@contextlib.contextmanager
def served(app: FastAPI, svc: FastInferService) -> Iterator[dict[str, Any]]:
    """The service's lifespan held open on a loop in another thread (a server serving ``app``):
    yields what it set (``batcher``); ``ended`` says whether it ended on exit."""
    entered, leave, box = threading.Event(), threading.Event(), {}

    async def serving() -> None:
        async with svc.lifespan(app):
            box["batcher"] = svc.state.batcher
            entered.set()
            while not leave.is_set():
                await asyncio.sleep(0.01)

    thread = threading.Thread(target=asyncio.run, args=(serving(),), daemon=True)
    thread.start()
    try:
        assert entered.wait(10), "the lifespan did not start"
        yield box
    finally:
        leave.set()
        thread.join(10)
        box["ended"] = not thread.is_alive()


def test_a_test_client_entered_on_an_app_being_served_is_refused() -> None:
    app, svc = service()
    with served(app, svc) as running:
        with pytest.raises(ConfigError, match="lifespan is already running"), TestClient(app):
            pass
        assert not running["batcher"].closed and svc.readiness()["ready"]
    assert running["ended"] and running["batcher"].closed


def test_a_second_service_installed_on_one_app_is_refused_naming_the_fix() -> None:
    app = FastAPI()
    first, second = FastInferService(), FastInferService(health_path="/b/healthz")
    first.install(app)
    with pytest.raises(ConfigError, match="another FastInferService is installed") as refused:
        second.install(app)  # was: its error handlers replaced the first's
    assert "One service per app" in str(refused.value) and "labels" in str(refused.value)
    with pytest.raises(ConfigError, match="installed on this app already"):
        first.install(app)
    second.install(FastAPI())  # an app of its own: fine
    assert not any(getattr(r, "path", "") == "/b/healthz" for r in app.routes)


@dataclasses.dataclass(frozen=True)
class ReadyStats:
    service_ready: int = gauge()


def test_a_statistics_asking_the_service_for_readiness_does_not_deadlock_manage() -> None:
    app, svc = service()
    asking = threading.local()

    class ReadyAware:
        """Exports whether the service is ready next to its own numbers."""

        def statistics(self) -> ReadyStats:
            if getattr(asking, "now", False):  # readiness() reads every managed statistics()
                return ReadyStats(service_ready=-1)
            asking.now = True
            try:
                return ReadyStats(service_ready=int(svc.readiness()["ready"]))
            finally:
                asking.now = False

        def close(self) -> None:
            pass

    with served(app, svc):
        assert svc.ready
        # managed after setup (a model added later): manage() reads its statistics()
        late = threading.Thread(
            target=svc.manage, args=(ReadyAware(),), kwargs={"name": "aware"}, daemon=True
        )
        late.start()
        late.join(5)
        # was: a deadlock on the service's lock, with /readyz and the shutdown blocked behind it
        assert not late.is_alive(), "manage() deadlocked on the service's lock"
        assert svc.readiness()["ready"]
