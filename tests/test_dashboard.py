"""The live dashboard (``FastInferService(dashboard=True)``): its data, and the page in a real browser.

The browser test drives Debian's Chromium (``/usr/bin/chromium``; ``python3 dev.py test``
installs it) with Playwright against a real uvicorn server on localhost: the page loads, its
numbers move while load runs, nothing is fetched from elsewhere and the console stays free of
errors. The screenshot is saved in the test's ``tmp_path`` and its path printed and recorded as
the ``screenshot`` property of the test.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.serve
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import until  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import fastinfer  # noqa: E402
from fastinfer.integrations._dashboard import Dashboard  # noqa: E402
from fastinfer.integrations.fastapi import FastInferService, run_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what the machine notes say Chromium needs as root on a closed network (python.md)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Body(BaseModel):
    x: int


def make_app(**svc_kw: Any) -> tuple[FastAPI, FastInferService]:
    svc = FastInferService(freeze_gc=False, **svc_kw)

    def model(xs: list[int]) -> list[int]:
        time.sleep(0.005)  # a few ms per batch, so that requests queue and batch
        return [x + 1 for x in xs]

    @svc.setup
    def build(svc: FastInferService) -> None:
        with svc.phase("load"):
            time.sleep(0.01)
        with svc.phase("warm-up"):
            model([0])
        svc.state.batcher = svc.manage(
            fastinfer.DynamicBatcher(
                model, max_batch_size=16, max_wait_ms=2, **svc.batcher_hooks()
            ),
            name="model",
        )

    app = FastAPI(lifespan=svc.lifespan)
    svc.install(app)

    @app.post("/predict")
    async def predict(body: Body, request: Request) -> dict[str, int]:
        return {"y": await svc.submit(svc.state.batcher, body.x, request)}

    return app, svc


class Load:
    """``clients`` threads posting to /predict until stopped; counts the answers."""

    def __init__(self, url: str, clients: int = 12) -> None:
        self.url, self.stop, self.sent = url, threading.Event(), 0
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                assert client.post("/predict", json={"x": i}).status_code == 200
                i += 1
                self.sent += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_the_dashboard_is_opt_in() -> None:
    app, svc = make_app()
    with run_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        until(lambda: svc.ready, "setup")
        assert client.get("/dashboard").status_code == 404
        assert client.get("/dashboard/data").status_code == 404


def test_dashboard_data_windows_the_recorder() -> None:
    app, svc = make_app(dashboard=True)
    with run_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        until(lambda: svc.ready, "setup")
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        # nothing to fetch from elsewhere (the SVG namespace is a name, not a request)
        text = page.text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "src=" not in text
        first = client.get("/dashboard/data").json()
        assert first["request_rate"] is None  # one sample: no window yet
        assert first["readiness"]["ready"] and set(first["readiness"]["phases"]) >= {"load"}
        with Load(url, clients=4) as load:
            until(lambda: load.sent >= 40, "some load")
            time.sleep(0.3)
            data = client.get("/dashboard/data").json()
        assert data["request_rate"] > 0 and data["status_rates"]["2xx"] > 0
        assert 0 < data["latency_p50_ms"] <= data["latency_p99_ms"]
        assert data["batch_sizes"] and data["batch_size_mean"] >= 1
        assert data["requests"]["ok"] >= 40
        assert data["http_requests"] >= 40  # the dashboard's own polls are not counted
        metrics = client.get("/metrics").text
    assert 'route="/dashboard/data"' not in metrics


def test_dashboard_rates_come_from_snapshot_differences() -> None:
    svc = FastInferService(freeze_gc=False)
    clock = [100.0]
    board = Dashboard(
        svc.recorder,
        svc.readiness,
        own_paths={"/metrics"},
        window_seconds=5,
        clock=lambda: clock[0],
    )
    hist = svc.recorder.histogram(
        "fastinfer_http_request_seconds", "", unit="seconds", labels=("route", "status")
    )
    assert board.data()["request_rate"] is None
    for _ in range(30):
        hist.labels(route="/predict", status="2xx").observe(0.004)
    hist.labels(route="/metrics", status="2xx").observe(1.0)  # the service's own: ignored
    clock[0] += 2.0
    d = board.data()
    assert d["request_rate"] == pytest.approx(15.0) and d["window_seconds"] == 2.0
    assert 2.5 <= d["latency_p50_ms"] <= 5.0 and d["latency_p99_ms"] <= 5.0
    clock[0] += 10.0  # nothing new: the window slides past the burst
    assert board.data()["request_rate"] == 0.0
    svc.metrics.batch_size.observe(3)
    svc.metrics.batch_size.observe(16)
    clock[0] += 1.0
    rows = board.data()["batch_sizes"]
    assert rows == [{"label": "3-4", "count": 1}, {"label": "9-16", "count": 1}]


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; "
    "`python3 dev.py test` installs it)",
)
def test_dashboard_in_a_real_browser(tmp_path: Path, record_property: Any) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    app, svc = make_app(dashboard=True)
    shot = tmp_path / "dashboard.png"
    problems: list[str] = []
    requests_elsewhere: list[str] = []
    with run_server(app) as url:
        until(lambda: svc.ready, "setup")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.on(
                    "console",
                    lambda m: (
                        problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning")
                        else None
                    ),
                )
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on(
                    "request",
                    lambda r: None if r.url.startswith(url) else requests_elsewhere.append(r.url),
                )

                # The page's CSP forbids eval, so wait_for_function (which evaluates strings)
                # cannot run in it: poll through selectors instead.
                def text(selector: str) -> str:
                    return page.text_content(selector) or ""

                def number(selector: str) -> float:
                    value = text(selector)
                    return float(value) if value not in ("", "-") else 0.0

                def poll(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
                    deadline = time.monotonic() + timeout
                    while not cond():
                        if time.monotonic() > deadline:
                            raise AssertionError(f"the page never showed {what}")
                        page.wait_for_timeout(100)

                page.goto(f"{url}/dashboard")
                poll(lambda: text("#state") == "ready", "the service as ready")
                assert "load" in text("#phases")  # the setup phases are drawn
                idle_rate = text("#rate")
                with Load(url):
                    poll(lambda: number("#rate") > 0, "a request rate above 0")
                    seen = []
                    for _ in range(3):  # three refreshes: the numbers keep moving
                        before = text("#updated")
                        poll(lambda: text("#updated") != before, "a refresh")  # noqa: B023
                        seen.append((number("#rate"), number("#p50"), number("#p99")))
                    poll(lambda: page.locator("#batches rect").count() > 0, "batch-size bars")
                    poll(lambda: page.locator("#spark-rate polyline").count() > 0, "a sparkline")
                    page.screenshot(path=str(shot), full_page=True)
                outcomes = page.text_content("#outcomes") or ""
            finally:
                browser.close()
    print(f"dashboard screenshot: {shot}")
    record_property("screenshot", str(shot))
    assert idle_rate in ("-", "0.0")
    assert all(rate > 0 and p50 > 0 and p99 >= p50 for rate, p50, p99 in seen), seen
    assert len(set(seen)) > 1, f"the numbers did not move: {seen}"
    assert "requests ok" in outcomes
    assert shot.stat().st_size > 20_000
    assert not problems, problems
    assert not requests_elsewhere, requests_elsewhere
