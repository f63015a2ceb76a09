"""Reliability figures (issue: Reliability): overload soak, SIGTERM drain, hot-loading a corrupt adapter.

    python bench/reliability.py [--seconds 30] [--clients 16]
Writes bench/results/reliability.json and reliability.md. Uses the shipped default adapter plus a corrupt
copy in a temporary adapters directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write  # noqa: E402
from tests.server_utils import ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BODY = {"question": "Which of these is a source of light?", "choices": ["the Sun", "the Moon", "a mirror", "a rock"],
        "samples": 10}


async def soak(url: str, seconds: float, clients: int) -> dict:
    codes: list[int] = []
    async with httpx.AsyncClient(timeout=600) as c:
        end = time.monotonic() + seconds

        async def client():
            while time.monotonic() < end:
                r = await c.post(url + "/predict", json=BODY)
                codes.append(r.status_code)
                if r.status_code == 429:
                    await asyncio.sleep(0.05)
        await asyncio.gather(*[client() for _ in range(clients)])
    return {"sent": len(codes), "answered_200": codes.count(200), "refused_429": codes.count(429),
            "other": len(codes) - codes.count(200) - codes.count(429)}


async def hot_load(url: str) -> dict:
    async with httpx.AsyncClient(timeout=600) as c:
        load = asyncio.create_task(c.post(url + "/v1/adapters/corrupt/load"))
        preds = await asyncio.gather(*[c.post(url + "/predict", json={**BODY, "samples": 2}) for _ in range(20)])
        r = await load
    return {"corrupt_load_status": r.status_code, "good_adapter_requests": len(preds),
            "good_adapter_failures": sum(p.status_code != 200 for p in preds)}


async def drain(srv: ServerProcess) -> dict:
    async with httpx.AsyncClient(timeout=600) as c:
        tasks = [asyncio.create_task(c.post(srv.url + "/predict", json=BODY)) for _ in range(6)]
        await asyncio.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        res = await asyncio.gather(*tasks, return_exceptions=True)
    ok = sum(1 for r in res if not isinstance(r, Exception) and r.status_code == 200)
    return {"in_flight_at_sigterm": len(tasks), "completed_200": ok, "exit_code": srv.proc.wait(120)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--queue-rows", type=int, default=40)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    shutil.copytree(ROOT / "adapters" / "default" / "arc-easy-dalorra", d / "arc-easy-dalorra")
    shutil.copytree(ROOT / "adapters" / "default" / "arc-easy-dalorra", d / "corrupt")
    f = d / "corrupt" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    srv = ServerProcess(d, "arc-easy-dalorra", d / "soak.log", DALORRA_MAX_QUEUE_ROWS=str(a.queue_rows),
                        DALORRA_MAX_BATCH_ROWS="40").wait_ready()
    try:
        ok0 = srv.metric("dalorra_requests_total", {"outcome": "ok"})
        s = asyncio.run(soak(srv.url, a.seconds, a.clients))
        s["server_counted_ok"] = srv.metric("dalorra_requests_total", {"outcome": "ok"}) - ok0
        s["server_counted_rejected"] = srv.metric("dalorra_requests_total", {"outcome": "rejected"})
        h = asyncio.run(hot_load(srv.url))
    finally:
        srv.stop()
    srv2 = ServerProcess(d, "arc-easy-dalorra", d / "drain.log").wait_ready()
    dr = asyncio.run(drain(srv2))
    srv2.stop()
    table = [
        f"## Overload soak: {a.clients} closed-loop clients for {a.seconds:.0f} s, S = 10, queue bound "
        f"{a.queue_rows} rows (≈ {a.clients * 10 // a.queue_rows}× what the queue admits)", "",
        "| sent | answered (200) | refused (429 + Retry-After) | other | server counted ok | server counted rejected |",
        "|---|---|---|---|---|---|",
        f"| {s['sent']} | {s['answered_200']} | {s['refused_429']} | {s['other']} | {s['server_counted_ok']:.0f} | "
        f"{s['server_counted_rejected']:.0f} |", "",
        "Every accepted request was answered exactly once when `answered` equals `server counted ok`.", "",
        "## Hot-loading a truncated adapter while serving", "",
        f"load answered {h['corrupt_load_status']}; {h['good_adapter_failures']} failures among "
        f"{h['good_adapter_requests']} concurrent requests on the good adapter.", "",
        "## SIGTERM drain", "",
        f"{dr['completed_200']} of {dr['in_flight_at_sigterm']} in-flight requests completed with 200; "
        f"exit code {dr['exit_code']} (uvicorn re-raises SIGTERM after its graceful shutdown: -15).", "",
        "Also covered by `tests/test_reliability.py` (schemathesis with 0 server errors, tokens, limits, "
        "path traversal)."]
    write("reliability", {"soak": s, "hot_load": h, "drain": dr, "settings": vars(a)}, "\n".join(table))


if __name__ == "__main__":
    main()
