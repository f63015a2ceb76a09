"""Server throughput and latency at S = 10 with 1 and 16 concurrent clients (real server process, loopback).

    python -m bench.serve_latency [--adapters-dir adapters/default --adapter arc-easy-dalorra]
        [--samples 10] [--concurrency 1 16] [--requests 16 64]
Writes bench/results/serve_latency.{json,md}. Bounded: each level sends a fixed number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from adapters.data import load_jsonl
from bench.common import write
from bench.loopback import ServerProcess
from bench.serve_efficiency import level  # the one load generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--adapters-dir", default=str(Path(__file__).resolve().parents[1] / "adapters" / "default")
    )
    ap.add_argument("--adapter", default="arc-easy-dalorra")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    a = ap.parse_args()
    items = load_jsonl("arc_easy/validation", limit=64)
    log = Path(tempfile.mkdtemp()) / "server.log"
    srv = ServerProcess(Path(a.adapters_dir), a.adapter, log).wait_ready()
    try:
        asyncio.run(level(srv.url, items, a.adapter, a.samples, 2, 4))  # warm-up
        runs = []
        for conc, n in zip(a.concurrency, a.requests, strict=True):
            r = asyncio.run(level(srv.url, items, a.adapter, a.samples, conc, n))
            r.pop("_answers")
            r["backend_calls"] = srv.metric("dalorra_backend_calls_total")
            runs.append(r)
            print(r, flush=True)
    finally:
        srv.stop()
    table = [
        "| S | concurrency | requests | throughput (q/s) | p50 (s) | p99 (s) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        table.append(
            f"| {r['samples']} | {r['concurrency']} | {r['requests']} | {r['throughput_qps']:.2f} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['errors']} |"
        )
    table.append(
        "\nARC-Easy validation questions (cloze scoring, 4 choices), default adapter, HF backend on CPU."
    )
    write("serve_latency", {"runs": runs, "adapter": a.adapter}, "\n".join(table))


if __name__ == "__main__":
    main()
