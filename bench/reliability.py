"""Reliability figures (issues: Reliability, Safe by default): overload soak, SIGTERM drain, hot-loading a
corrupt adapter, a poisoned request beside good ones, unloading under traffic, an oversized chunked body, and a
burst beyond what can finish before the request deadline (the 429/504 split).

    python -m bench.reliability [--seconds 30] [--clients 16] [--before OLD_RESULTS.json]
Writes bench/results/reliability.json and reliability.md. Uses the shipped default adapter plus a corrupt
copy and a spare copy in a temporary adapters directory. --before takes the JSON this script wrote when run
in a checkout of the server before a change, and puts those figures beside the new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import write
from bench.loopback import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
BODY = {
    "question": "Which of these is a source of light?",
    "choices": ["the Sun", "the Moon", "a mirror", "a rock"],
    "samples": 10,
}


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
    return {
        "sent": len(codes),
        "answered_200": codes.count(200),
        "refused_429": codes.count(429),
        "other": len(codes) - codes.count(200) - codes.count(429),
    }


async def hot_load(url: str) -> dict:
    async with httpx.AsyncClient(timeout=600) as c:
        load = asyncio.create_task(c.post(url + "/v1/adapters/corrupt/load", json={}))
        preds = await asyncio.gather(
            *[c.post(url + "/predict", json={**BODY, "samples": 2}) for _ in range(20)]
        )
        r = await load
    return {
        "corrupt_load_status": r.status_code,
        "good_adapter_requests": len(preds),
        "good_adapter_failures": sum(p.status_code != 200 for p in preds),
    }


POISON = b'{"question":"q?","choices":["\\udfff","b"],"samples":1}'  # a lone surrogate, valid JSON


async def poison(url: str, good: int = 30) -> dict:
    """N good requests with one poisoned request in the same batch: how many good ones still get 200. A blocker
    request keeps the backend busy while they queue, so they are gathered into one batch together."""
    async with httpx.AsyncClient(timeout=600) as c:
        blocker = asyncio.create_task(c.post(url + "/predict", json={**BODY, "samples": 10, "seed": 10_000}))
        await asyncio.sleep(1.0)
        goods = [c.post(url + "/predict", json={**BODY, "samples": 1, "seed": i}) for i in range(good)]
        bad = c.post(url + "/predict", content=POISON, headers={"content-type": "application/json"})
        res = await asyncio.gather(bad, *goods)
        await blocker
    codes = [r.status_code for r in res[1:]]
    return {
        "good_requests": good,
        "good_answered_200": codes.count(200),
        "good_statuses": {str(k): codes.count(k) for k in sorted(set(codes))},
        "poisoned_status": res[0].status_code,
    }


async def unload(url: str, clients: int = 4) -> dict:
    """Unload an idle adapter while another serves traffic (max /health/live latency during it), then unload an
    adapter with requests of its own in flight (their statuses)."""
    async with httpx.AsyncClient(timeout=600) as c:
        r = await c.post(url + "/v1/adapters/spare/load", json={})
        assert r.status_code == 200, r.text
        stop = False
        lat: list[tuple[float, float]] = []

        async def traffic():
            while not stop:
                await c.post(url + "/predict", json={**BODY, "samples": 4, "fresh": True})

        async def probe():
            while not stop:
                t = time.perf_counter()
                await c.get(url + "/health/live")
                lat.append((t, time.perf_counter() - t))
                await asyncio.sleep(0.05)

        bg = [asyncio.create_task(traffic()) for _ in range(clients)] + [asyncio.create_task(probe())]
        await asyncio.sleep(3.0)  # a batch is running
        t0 = time.perf_counter()
        idle = await c.post(url + "/v1/adapters/spare/unload", json={})
        t1 = time.perf_counter()
        await asyncio.sleep(0.5)
        stop = True
        await asyncio.gather(*bg)
        during = [d for t, d in lat if t0 - 0.05 <= t <= t1] or [0.0]
        await c.post(url + "/v1/adapters/spare/load", json={})
        own = [
            asyncio.create_task(
                c.post(url + "/predict", json={**BODY, "adapter": "spare", "samples": 4, "seed": i})
            )
            for i in range(8)
        ]
        await asyncio.sleep(1.0)  # admitted, queued or scoring
        busy = await c.post(url + "/v1/adapters/spare/unload", json={})
        codes = [x.status_code for x in await asyncio.gather(*own)]
    return {
        "idle_unload_status": idle.status_code,
        "idle_unload_seconds": round(t1 - t0, 3),
        "max_live_latency_s_during_unload": round(max(during), 3),
        "live_probes_during_unload": len(during),
        "busy_unload_status": busy.status_code,
        "busy_adapter_requests": len(codes),
        "busy_adapter_statuses": {str(k): codes.count(k) for k in sorted(set(codes))},
    }


async def chunked(url: str, mib: int = 30) -> dict:
    """A chunked body (no Content-Length) of `mib` MiB on a raw socket: the status line the server answers, and
    how much had been sent when it did (kernel buffers hold a few MiB the server never reads)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    t, sent = time.perf_counter(), 0
    answer = asyncio.create_task(reader.readline())
    try:
        for _ in range(mib * 16):
            if answer.done():
                break
            writer.write(b"10000\r\n" + b" " * 65536 + b"\r\n")  # 64 KiB chunks
            await writer.drain()
            sent += 65536
        else:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except ConnectionError:  # the server answered and closed while we were still sending
        pass
    try:
        line = await asyncio.wait_for(answer, 120)
        status = int(line.split()[1]) if line.startswith(b"HTTP/") else line.decode(errors="replace")
    except (TimeoutError, ConnectionError, IndexError, ValueError) as exc:
        status = type(exc).__name__
    writer.close()
    return {
        "body_mib": mib,
        "status": status,
        "bytes_sent_before_answer": sent,
        "seconds": round(time.perf_counter() - t, 2),
    }


async def burst(url: str, n: int) -> dict:
    """n requests (S = 10) at once, far more than finish before the request deadline: 429 now or 504 later?"""
    async with httpx.AsyncClient(timeout=600) as c:
        t = time.perf_counter()
        rs = await asyncio.gather(
            *[c.post(url + "/predict", json={**BODY, "seed": i, "fresh": False}) for i in range(n)]
        )
        wall = time.perf_counter() - t
    codes = [r.status_code for r in rs]
    ra = [int(r.headers["retry-after"]) for r in rs if r.status_code == 429 and "retry-after" in r.headers]
    admitted = codes.count(200) + codes.count(504)
    return {
        "requests": n,
        "answered_200": codes.count(200),
        "refused_429": codes.count(429),
        "timed_out_504": codes.count(504),
        "other": n - codes.count(200) - codes.count(429) - codes.count(504),
        "timed_out_share_of_admitted": round(codes.count(504) / admitted, 3) if admitted else 0.0,
        "retry_after_s": [min(ra), max(ra)] if ra else None,
        "wall_s": round(wall, 1),
    }


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
    ap.add_argument("--burst", type=int, default=48, help="requests in the over-deadline burst")
    ap.add_argument(
        "--burst-timeout",
        type=float,
        default=120,
        help="request deadline (s) of the server that runs the poison, unload, chunked and burst probes",
    )
    ap.add_argument("--before", default=None, help="results JSON of a run against the server before a change")
    ap.add_argument(
        "--only-safety",
        action="store_true",
        help="run only the poison/unload/chunked/overload probes; "
        "soak, hot-load and drain figures are kept from the existing results file",
    )
    ap.add_argument(
        "--json-out", default=None, help="with --only-safety: write the probes' JSON here instead"
    )
    ap.add_argument(
        "--from-json",
        default=None,
        help="with --only-safety: take the probes' figures from this "
        "--json-out file (a run made earlier) instead of running them",
    )
    ap.add_argument(
        "--ready-timeout", type=float, default=900, help="seconds to wait for each server to start"
    )
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    shutil.copytree(ROOT / "adapters" / "default" / "arc-easy-dalorra", d / "arc-easy-dalorra")
    shutil.copytree(ROOT / "adapters" / "default" / "arc-easy-dalorra", d / "corrupt")
    shutil.copytree(ROOT / "adapters" / "default" / "arc-easy-dalorra", d / "spare")
    f = d / "corrupt" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    if a.from_json:
        ran = json.loads(Path(a.from_json).read_text())
        new = {k: ran[k] for k in ("poison", "unload", "chunked", "overload")}
        a.after_command = f"{ran.get('command')} ({ran.get('machine', {}).get('date', '')})"
    else:
        a.after_command = "this run"
        srv3 = ServerProcess(
            d,
            "arc-easy-dalorra",
            d / "safe.log",
            DALORRA_REQUEST_TIMEOUT_S=str(a.burst_timeout),
            DALORRA_RESULT_CACHE_SIZE="0",
        ).wait_ready(a.ready_timeout)
        try:
            p = asyncio.run(poison(srv3.url))
            u = asyncio.run(unload(srv3.url))
            ch = asyncio.run(chunked(srv3.url))
            b = asyncio.run(burst(srv3.url, a.burst))
        finally:
            srv3.stop()
        new = {"poison": p, "unload": u, "chunked": ch, "overload": b}
    if a.only_safety and a.json_out:
        Path(a.json_out).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "machine": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                    **new,
                    "settings": vars(a),
                },
                indent=2,
                default=float,
            )
        )
        return
    if a.only_safety:  # the other sections as the last full run measured them
        prev = json.loads((ROOT / "bench" / "results" / "reliability.json").read_text())
        s, h, dr = prev["soak"], prev["hot_load"], prev["drain"]
    else:
        srv = ServerProcess(
            d,
            "arc-easy-dalorra",
            d / "soak.log",
            DALORRA_MAX_QUEUE_ROWS=str(a.queue_rows),
            DALORRA_MAX_BATCH_ROWS="40",
        ).wait_ready(a.ready_timeout)
        try:
            ok0 = srv.metric("dalorra_requests_total", {"outcome": "ok"})
            s = asyncio.run(soak(srv.url, a.seconds, a.clients))
            s["server_counted_ok"] = srv.metric("dalorra_requests_total", {"outcome": "ok"}) - ok0
            s["server_counted_rejected"] = srv.metric("dalorra_requests_total", {"outcome": "rejected"})
            h = asyncio.run(hot_load(srv.url))
        finally:
            srv.stop()
        srv2 = ServerProcess(d, "arc-easy-dalorra", d / "drain.log").wait_ready(a.ready_timeout)
        dr = asyncio.run(drain(srv2))
        srv2.stop()
    table = [
        f"## Overload soak: {a.clients} closed-loop clients for {a.seconds:.0f} s, S = 10, queue bound "
        f"{a.queue_rows} rows (≈ {a.clients * 10 // a.queue_rows}× what the queue admits)",
        "",
        "| sent | answered (200) | refused (429 + Retry-After) | other | server counted ok | server counted rejected |",
        "|---|---|---|---|---|---|",
        f"| {s['sent']} | {s['answered_200']} | {s['refused_429']} | {s['other']} | {s['server_counted_ok']:.0f} | "
        f"{s['server_counted_rejected']:.0f} |",
        "",
        "Every accepted request was answered exactly once when `answered` equals `server counted ok`.",
        "",
        "## Hot-loading a truncated adapter while serving",
        "",
        f"load answered {h['corrupt_load_status']}; {h['good_adapter_failures']} failures among "
        f"{h['good_adapter_requests']} concurrent requests on the good adapter.",
        "",
        "## SIGTERM drain",
        "",
        f"{dr['completed_200']} of {dr['in_flight_at_sigterm']} in-flight requests completed with 200; "
        f"exit code {dr['exit_code']} (uvicorn re-raises SIGTERM after its graceful shutdown: -15).",
        "",
        "Also covered by `tests/test_reliability.py` (schemathesis with 0 server errors, tokens, limits, "
        "path traversal).",
    ]
    if a.only_safety:
        table.insert(0, "Soak, hot-load and drain: figures of the last full run (this run: --only-safety).\n")
    before = {}
    if a.before:
        old = json.loads(Path(a.before).read_text())
        before = {k: old[k] for k in new if k in old}
        before["command"], before["date"] = old.get("command"), old.get("machine", {}).get("date")
    table += _safety_table(new, before, a)
    write(
        "reliability",
        {"soak": s, "hot_load": h, "drain": dr, **new, "before": before, "settings": vars(a)},
        "\n".join(table),
    )


def _safety_table(new: dict, before: dict, a) -> list[str]:
    """Issue "Safe by default": the same four probes before and after the change, side by side."""

    def row(label, key, fmt):
        old = fmt(before[key]) if key in before else "—"
        return f"| {label} | {old} | {fmt(new[key])} |"

    def u(x):
        return (
            f"live max {x['max_live_latency_s_during_unload']} s during a {x['idle_unload_seconds']} s "
            f"idle unload; busy unload {x['busy_unload_status']}, its requests {x['busy_adapter_statuses']}"
        )

    def o(x):
        return (
            f"{x['answered_200']}× 200, {x['refused_429']}× 429, {x['timed_out_504']}× 504 "
            f"(504 share of admitted {x['timed_out_share_of_admitted']:.0%}), Retry-After {x['retry_after_s']}"
        )

    return [
        "",
        "## Safe by default: before and after",
        "",
        f"Before: {before.get('command', 'not measured')} ({before.get('date', '')}), the server before the "
        "change, run from a git worktree of its commit with this script copied in. After: "
        f"{a.after_command}. Both on this 2-core machine while other jobs kept it loaded (load average > 10): "
        "absolute times are slow and noisy, the statuses are the point.",
        "",
        "| probe | before | after |",
        "|---|---|---|",
        row(
            "poison: good answered 200 beside one request with a lone surrogate",
            "poison",
            lambda x: (
                f"{x['good_answered_200']}/{x['good_requests']} {x.get('good_statuses', '')} "
                f"(poisoned: {x['poisoned_status']})"
            ),
        ),
        row("unload under traffic", "unload", u),
        row(
            f"chunked body of {new['chunked']['body_mib']} MiB, no Content-Length",
            "chunked",
            lambda x: (
                f"{x['status']} after {x['bytes_sent_before_answer'] / 2**20:.1f} MiB, {x['seconds']} s"
            ),
        ),
        row(f"burst of {a.burst} requests (S = 10), request deadline {a.burst_timeout:.0f} s", "overload", o),
        "",
        "Poison: a blocker request keeps the backend busy while the 30 good requests (S = 1) and the poisoned "
        "one queue, so they share one batch. Unload: 4 clients on the default adapter while an idle adapter is "
        "unloaded (max `/health/live` latency), then 8 requests of the adapter being unloaded. Chunked: the "
        "server stops reading at the 1 MB limit; the MiB figure is what the client had pushed into socket "
        "buffers by the time the answer came. Burst: 429 at once (with Retry-After) instead of 504 after the "
        "deadline.",
    ]


if __name__ == "__main__":
    main()
