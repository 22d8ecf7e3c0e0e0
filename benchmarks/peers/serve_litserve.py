"""LitServe with batching, tuned as LitServe's own docs say for a CPU.

Runs in the LitServe venv (``benchmarks/.peers/litserve``). Tuning, from the ``LitServer`` /
``LitAPI`` / ``run`` docstrings and LitServe's "Batching" page (litserve 0.2.19):

- ``accelerator="cpu"``, ``workers_per_device=2``: "For CPU, set to the number of cores";
- ``LitAPI(max_batch_size=32, batch_timeout=0.005)``: batching (set on the API since 0.2.x);
- ``fast_queue=True``: ZeroMQ transport, "for high-throughput scenarios (>100 RPS)";
- ``run(num_api_servers=None)``: as many HTTP server processes as inference workers, the
  recommended default; ``log_level="warning"`` and ``generate_client_file=False`` for production;
- ``OMP_NUM_THREADS=1`` (set by the benchmark): 2 workers x 1 thread = 2 cores, as issue 19 ran
  it (LitServe's docs say nothing about threads; torch's default would give each of the two
  workers both cores).

    python benchmarks/peers/serve_litserve.py --model bert-mini --checkpoint CKPT --port 8000
"""

from __future__ import annotations

from typing import Any

import common
import litserve as ls

WORKERS = 2


class ClassifierAPI(ls.LitAPI):
    def __init__(self, model: str, checkpoint: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name, self.checkpoint = model, checkpoint

    def setup(self, device: str) -> None:
        self.spec = common.MODELS[self.model_name]
        self.model = common.load_plain(self.spec, self.checkpoint)
        self.tok = self.spec.tokenizer()
        print(f"litserve worker ready on {device}: {common.threads_report()}", flush=True)

    # No annotations on these two: LitServe reads them to pick the request and response types,
    # and without them it passes the parsed JSON body and returns the dict as JSON.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return str(request["text"])

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:  # a batch: LitServe's batch()
        return common.predict(self.model, self.tok, self.spec, texts)

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return output


def main() -> None:
    args = common.server_args(__doc__.splitlines()[0])
    api = ClassifierAPI(
        args.model,
        str(args.checkpoint),
        max_batch_size=common.MAX_BATCH_SIZE,
        batch_timeout=common.MAX_WAIT_MS / 1000,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=WORKERS, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
