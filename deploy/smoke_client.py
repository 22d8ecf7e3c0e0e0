"""The HTTP side of deploy/smoke.sh: standard library only, so any python3 on the host runs it.

    python3 deploy/smoke_client.py wait-ready URL TIMEOUT     # seconds until /readyz said 200
    python3 deploy/smoke_client.py check URL [--warm|--cold]  # requests, errors, /metrics
    python3 deploy/smoke_client.py burst URL SECONDS          # load until the server goes away

Each prints one JSON object on stdout and exits 1 (with the reason on stderr) when a check fails.
Every request goes to URL, which smoke.sh makes a 127.0.0.1 address.
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any
from urllib.parse import urlsplit


def fail(why: str) -> None:
    print(f"smoke_client: FAILED: {why}", file=sys.stderr)
    sys.exit(1)


def get(url: str, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def post(url: str, body: Any, timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def metrics(url: str) -> dict[str, float]:
    """``name{labels}`` -> value from the Prometheus text (labels as written)."""
    status, body, _ = get(f"{url}/metrics")
    if status != 200:
        fail(f"/metrics answered {status}")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_ready(url: str, timeout: float) -> None:
    t0 = time.monotonic()
    phases: list[str] = []
    while time.monotonic() - t0 < timeout:
        try:
            status, body, _ = get(f"{url}/readyz", timeout=2)
        except OSError:
            time.sleep(0.05)  # not listening yet
            continue
        info = json.loads(body)
        if info.get("phase") not in phases:
            phases.append(info.get("phase"))
        if status == 200:
            print(json.dumps({"ready_seconds": time.monotonic() - t0, "readyz": info}))
            return
        if info.get("phase") == "failed":
            fail(f"setup failed: {info}")
        time.sleep(0.1)
    fail(f"not ready after {timeout} s (phases seen: {phases})")


def check(url: str, mode: str) -> None:
    status, body, _ = get(f"{url}/readyz")
    ready = json.loads(body)
    if status != 200 or not {"threads", "import", "compile"} <= set(ready["phases"]):
        fail(f"/readyz: {status} {ready}")
    if "admission" not in ready:
        fail("/readyz has no admission measurement")
    # predictions, 64 concurrent clients, 4 each
    results: Counter[int] = Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(k)
        for _ in range(4):
            x = [rng.uniform(-1, 1) for _ in range(32)]
            code, data, _ = post(f"{url}/predict", {"x": x})
            if code == 200 and len(json.loads(data)["y"]) != 8:
                code = -1
            with lock:
                results[code] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if results != Counter({200: 256}):
        fail(f"256 predictions answered {dict(results)}")
    # errors in the documented body
    code, data, _ = post(f"{url}/predict", {"x": [1.0, 2.0]})
    if code != 422 or json.loads(data)["error"] != "invalid_input":
        fail(f"a wrong shape answered {code} {data!r}")
    code, data, _ = get(f"{url}/no-such-route")
    if code != 404 or set(json.loads(data)) != {"error", "detail"}:
        fail(f"an unknown route answered {code} {data!r}")
    m = metrics(url)
    hits = m.get('fastinfer_compile_cache_total{result="hit"}', 0.0)
    misses = m.get('fastinfer_compile_cache_total{result="miss"}', 0.0)
    ok = m.get('fastinfer_requests_total{outcome="ok"}', 0.0)
    batches = m.get("fastinfer_batch_size_count", 0.0)
    if ok < 256 or batches < 1 or "fastinfer_queue_depth" not in m:
        fail(f"/metrics: ok={ok} batches={batches} queue_depth={'fastinfer_queue_depth' in m}")
    if mode == "warm" and (misses != 0 or hits < 1):
        fail(f"the container compiled at start-up: cache hits={hits} misses={misses}")
    if mode == "cold" and misses < 1:
        fail(f"a start without the bundle should compile: cache hits={hits} misses={misses}")
    print(
        json.dumps(
            {
                "predictions_ok": results[200],
                "cache_hits": hits,
                "cache_misses": misses,
                "mean_batch": m.get("fastinfer_batch_size_sum", 0.0) / batches,
                "phases": ready["phases"],
                "admission": ready["admission"],
            }
        )
    )


def burst(url: str, seconds: float) -> None:
    """32 clients send until the server stops answering (or ``seconds`` pass), one connection
    per request. Counts: 200s; requests the server refused or dropped before answering (it had
    stopped accepting); any other answer (a failure)."""
    parts = urlsplit(url)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    gone = threading.Event()

    def client(k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < stop and not gone.is_set():
            body = json.dumps({"x": [rng.uniform(-1, 1) for _ in range(32)]})
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            try:
                conn.request("POST", "/predict", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                key = "ok" if resp.status == 200 else f"status_{resp.status}"
            except ConnectionRefusedError:
                key = "refused"
                gone.set()
            except (ConnectionError, http.client.RemoteDisconnected, OSError):
                key = "dropped_unanswered"
            finally:
                conn.close()
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(dict(counts)))


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "wait-ready":
        wait_ready(argv[1], float(argv[2]))
    elif len(argv) >= 2 and argv[0] == "check":
        check(argv[1], "cold" if "--cold" in argv else "warm")
    elif len(argv) >= 3 and argv[0] == "burst":
        burst(argv[1], float(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
