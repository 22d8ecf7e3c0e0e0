"""One process of an offline ceiling: full batches through the model, no HTTP.

The benchmark starts ``processes`` of these at once (with the stack's environment, e.g.
``OMP_NUM_THREADS=1``), each running ``--slots`` Python threads that tokenize, run a forward pass
under ``inference_mode`` and post-process batches of 32 texts, with ``--threads`` torch threads.
Each prints ``READY`` after its warm-up, starts when it reads ``GO`` on stdin (so all run
together) and prints one JSON line: items done and seconds taken.

    python benchmarks/peers/ceiling.py --model bert-mini --checkpoint CKPT --prepare plain
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import common
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(common.MODELS), required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--prepare", default="plain", help="plain, or fastinfer:<variant>")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=common.MAX_BATCH_SIZE)
    args = p.parse_args()
    spec = common.MODELS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prepare == "plain":
        model = common.load_plain(spec, args.checkpoint)
    else:
        import serve_fastinfer

        model = serve_fastinfer.prepare_model(args.prepare.split(":", 1)[1], spec, args.checkpoint)
    tok = spec.tokenizer()
    texts = spec.texts(1024, seed=11)
    batches = [texts[i : i + args.batch] for i in range(0, len(texts) - args.batch + 1, args.batch)]
    for b in batches[:2]:
        common.predict(model, tok, spec, b)
    print("READY", flush=True)
    sys.stdin.readline()  # GO

    done = [0] * args.slots
    finished = [0.0] * args.slots
    t0 = time.perf_counter()
    end = t0 + args.seconds

    def loop(slot: int) -> None:
        i = slot
        while time.perf_counter() < end:
            b = batches[i % len(batches)]
            common.predict(model, tok, spec, b)
            done[slot] += len(b)
            finished[slot] = time.perf_counter()
            i += args.slots

    workers = [threading.Thread(target=loop, args=(s,)) for s in range(args.slots)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out = {"items": sum(done), "seconds": max(finished) - t0, "threads": torch.get_num_threads()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
