#!/usr/bin/env bash
# Smoke-test the service image for real: build (or reuse) it, start it cold and warm, send
# requests, read /metrics, check it started warm, stop it under load and check the drain.
#
#   deploy/smoke.sh                      # from anywhere; needs a Docker engine
#   REPORT=smoke.json deploy/smoke.sh    # also write the figures as JSON
#
# Every container runs with --network host and its server bound to 127.0.0.1 on a free port, so
# every request goes to 127.0.0.1 (never to the engine's bridge addresses) and nothing listens
# beyond this machine. Variables:
#   IMAGE        image to build/reuse (default fastinfer-app:smoke; reused while its sources match)
#   BASE_IMAGE   base image (default: fastinfer-base:bookworm, built by deploy/docker/base.sh from
#                Debian packages when missing; python:3.11-slim works where a registry does)
#   TORCH_INDEX  package index for torch (default: the PyPI index when a local torch wheel was
#                linked into deploy/wheels/ from $PIP_FIND_LINKS, else the Dockerfile's default)
#   PYTHON       python3 for the HTTP checks (standard library only; default python3)
#   REBUILD=1    build even when a matching image exists
# Exit status: 0 all checks passed, 1 a check failed, 2 no Docker engine (the reason on stderr).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
IMAGE=${IMAGE:-fastinfer-app:smoke}
PYTHON=${PYTHON:-python3}
REPORT=${REPORT:-}
CLIENT="$PYTHON $ROOT/deploy/smoke_client.py"
NAME="fastinfer-smoke-$$"

log() { echo "[smoke] $*" >&2; }
die() { echo "[smoke] FAILED: $*" >&2; exit 1; }
now() { "$PYTHON" -c 'import time; print(time.time())'; }
elapsed() { "$PYTHON" -c "print(round($(now) - $1, 1))"; }

if ! docker info >/dev/null 2>&1; then
    echo "[smoke] no Docker engine: 'docker info' failed (install docker.io and start dockerd)" >&2
    exit 2
fi

cleanup() { docker rm -f "$NAME-cold" "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# ---- base image ----
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=fastinfer-base:bookworm
    if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "building the base image $BASE_IMAGE from Debian packages (debootstrap)"
        t0=$(now)
        BASE_IMAGE=$BASE_IMAGE deploy/docker/base.sh >&2
        BASE_SECONDS=$(elapsed "$t0")
    fi
fi

# ---- offline helpers: a local torch wheel, the proxy's CA ----
if [ -n "${PIP_FIND_LINKS:-}" ]; then
    for wheel in "${PIP_FIND_LINKS%/}"/torch-*.whl; do
        [ -f "$wheel" ] || continue
        [ -f "deploy/wheels/$(basename "$wheel")" ] \
            || ln "$wheel" deploy/wheels/ 2>/dev/null || cp "$wheel" deploy/wheels/
        TORCH_INDEX=${TORCH_INDEX:-${PIP_INDEX_URL:-https://pypi.org/simple}}
    done
fi
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" deploy/certs/pip-cert.crt
fi

# ---- build, or reuse an image built from the same sources ----
HASH=$( (cat deploy/Dockerfile deploy/app.py pyproject.toml README.md .dockerignore;
         find fastinfer -name '*.py' -print0 | sort -z | xargs -0 cat;
         echo "$BASE_IMAGE ${TORCH_INDEX:-default}") | sha256sum | cut -c1-16)
HAVE=$(docker image inspect -f '{{ index .Config.Labels "fastinfer.smoke.sources" }}' "$IMAGE" \
       2>/dev/null || true)
if [ "${REBUILD:-0}" != 1 ] && [ "$HAVE" = "$HASH" ]; then
    log "reusing $IMAGE (built from these sources)"
    BUILD_SECONDS=null
else
    log "building $IMAGE (base $BASE_IMAGE)"
    args=(--network host -f deploy/Dockerfile -t "$IMAGE" --label "fastinfer.smoke.sources=$HASH"
          --build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ -n "${TORCH_INDEX:-}" ] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
    t0=$(now)
    docker build "${args[@]}" . >"${TMPDIR:-/tmp}/$NAME-build.log" 2>&1 \
        || { tail -40 "${TMPDIR:-/tmp}/$NAME-build.log" >&2; die "docker build failed"; }
    BUILD_SECONDS=$(elapsed "$t0")
    log "built in ${BUILD_SECONDS} s"
fi
SIZE=$(docker image inspect -f '{{ .Size }}' "$IMAGE")

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
run() {  # run NAME PORT [docker args...]: the image's server, on 127.0.0.1:PORT only
    local name=$1 port=$2
    shift 2
    docker run -d --name "$name" --network host --cpus 2 "$@" "$IMAGE" \
        uvicorn app:app --app-dir /app --host 127.0.0.1 --port "$port" \
        --timeout-graceful-shutdown 30 >/dev/null
}

# ---- cold start: no bundle, so the model compiles in the container ----
PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
log "cold start (no bundle) on $URL"
t0=$(now)
run "$NAME-cold" "$PORT" -e APP_BUNDLE=/nonexistent
$CLIENT wait-ready "$URL" 600 >/dev/null || { docker logs "$NAME-cold" >&2; die "cold start"; }
COLD=$(elapsed "$t0")
COLD_CHECK=$($CLIENT check "$URL" --cold) || { docker logs "$NAME-cold" >&2; die "cold checks"; }
docker stop -t 40 "$NAME-cold" >/dev/null
docker rm "$NAME-cold" >/dev/null

# ---- warm start: the bundle baked in at build time ----
PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
log "warm start (baked bundle) on $URL"
t0=$(now)
run "$NAME" "$PORT"
READY=$($CLIENT wait-ready "$URL" 300) || { docker logs "$NAME" >&2; die "warm start"; }
WARM=$(elapsed "$t0")
CHECK=$($CLIENT check "$URL" --warm) || { docker logs "$NAME" >&2; die "warm checks"; }
log "warm: ready in ${WARM} s (cold: ${COLD} s); $CHECK"

# ---- graceful drain: SIGTERM while 32 clients keep sending ----
BURST_OUT="${TMPDIR:-/tmp}/$NAME-burst.json"
$CLIENT burst "$URL" 60 >"$BURST_OUT" &
BURST_PID=$!
sleep 2
log "docker stop (SIGTERM) under load"
docker stop -t 40 "$NAME" >/dev/null
wait "$BURST_PID" || die "the load generator failed"
BURST=$(cat "$BURST_OUT")
rm -f "$BURST_OUT"
EXIT_CODE=$(docker inspect -f '{{ .State.ExitCode }}' "$NAME")
LOGS=$(docker logs "$NAME" 2>&1)
DRAINED=$(grep -o 'drained: .*' <<<"$LOGS" | tail -1) || true
grep -q "Application shutdown complete" <<<"$LOGS" || { echo "$LOGS" >&2; die "no graceful shutdown"; }
[ -n "$DRAINED" ] || { echo "$LOGS" >&2; die "the batcher did not report its drain"; }
case "$EXIT_CODE" in 0 | 143) ;; *) echo "$LOGS" >&2; die "exit code $EXIT_CODE" ;; esac

"$PYTHON" - "$CHECK" "$BURST" "$DRAINED" <<'EOF' || { echo "$LOGS" >&2; die "drain"; }
import json, re, sys
check, burst = json.loads(sys.argv[1]), json.loads(sys.argv[2])
server = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", sys.argv[3])}
answered = check["predictions_ok"] + burst.get("ok", 0)
bad = {k: v for k, v in burst.items() if k.startswith("status_")}
problems = []
if burst.get("ok", 0) < 1:
    problems.append("no request was served during the burst")
if bad:
    problems.append(f"answers other than 200 during the drain: {bad}")
if server["ok"] != answered:
    problems.append(f"the server finished {server['ok']} requests, clients got {answered} answers")
for k in ("failed", "expired", "cancelled", "queued"):
    if server[k]:
        problems.append(f"{k}={server[k]} at shutdown")
if problems:
    sys.exit("drain: " + "; ".join(problems))
EOF
log "drain: clients $BURST; server $DRAINED; exit code $EXIT_CODE"

SUMMARY=$("$PYTHON" - <<EOF
import json
print(json.dumps({
    "image": "$IMAGE", "base_image": "$BASE_IMAGE", "image_bytes": $SIZE,
    "base_build_seconds": ${BASE_SECONDS:-None}, "build_seconds": ${BUILD_SECONDS/null/None},
    "cold_start_seconds": $COLD, "warm_start_seconds": $WARM,
    "warm_check": $CHECK, "cold_check": $COLD_CHECK, "burst": $BURST,
    "drained": "$DRAINED", "exit_code": $EXIT_CODE,
}, indent=2))
EOF
)
[ -n "$REPORT" ] && echo "$SUMMARY" >"$REPORT"
echo "$SUMMARY"
log "all checks passed"
