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
            # let the loop read what came back: once the server answers and closes, its reset can discard a
            # status line that arrived but was not yet read
            await asyncio.sleep(0.002)
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


M = "arc-easy-dalorra"
HI = [{"role": "user", "content": "hi"}]
KSERVE = {
    "inputs": [
        {"name": "question", "shape": [1], "datatype": "BYTES", "data": ["Which is a source of light?"]},
        {"name": "choices", "shape": [1, 2], "datatype": "BYTES", "data": ["the Sun", "a rock"]},
    ]
}
# (probe, route, body, extra headers, statuses that are right): the defects, sent to the real server
PROBES = [
    (
        "lone surrogate in a completion prompt",
        "/v1/completions",
        {"model": M, "prompt": "a\ud800b", "max_tokens": 2},
    ),
    (
        "lone surrogate in a streamed chat message",
        "/v1/chat/completions",
        {"model": M, "messages": [{"role": "user", "content": "x\ud800"}], "stream": True},
    ),
    (
        "seed = 2^64 (chat)",
        "/v1/chat/completions",
        {"model": M, "messages": HI, "max_tokens": 2, "seed": 2**64},
    ),
    ("mask_seed = 2^64 (completion)", "/v1/completions", {"model": M, "prompt": "hi", "mask_seed": 2**64}),
    (
        "max_epistemic = Infinity (streamed chat)",
        "/v1/chat/completions",
        {"model": M, "messages": HI, "max_tokens": 2, "max_epistemic": float("inf"), "stream": True},
    ),
    (
        "min_confidence = NaN (completion)",
        "/v1/completions",
        {"model": M, "prompt": "hi", "min_confidence": float("nan")},
    ),
    ("KServe id with a lone surrogate", f"/v2/models/{M}/infer", {**KSERVE, "id": "req-\ud800"}),
    ("lone surrogate in a /predict choice", "/predict", {"question": "q?", "choices": ["\udfff", "b"]}),
    ("/feedback with a label out of range", "/feedback", {"receipt": "x" * 40, "label": -1}),
]
PROXIED = [  # admin actions relayed by a same-host proxy: the proxy's header names a remote client
    ("admin load relayed with X-Real-IP", {"x-real-ip": "203.0.113.7"}),
    ("admin load relayed with Forwarded", {"forwarded": "for=203.0.113.7;proto=https"}),
]
COUNTED = ("dalorra_requests_total", "dalorra_generation_requests_total", "dalorra_feedback_total")


async def probes(srv: ServerProcess) -> list[dict]:
    """Each defect the issue found, against the real server: the status, whether the body is strict JSON (an
    SSE stream's every event), and how many outcome counters moved (a refusal must be counted)."""
    from bench.fuzz import encode, strict_json

    def counted() -> float:
        return sum(srv.metric(name) for name in COUNTED)

    out = []
    async with httpx.AsyncClient(timeout=600) as c:
        cases = [(name, route, body, {}, (400, 422)) for name, route, body in PROBES]
        cases += [(name, "/v1/adapters/spare/load", {}, h, (403,)) for name, h in PROXIED]
        for name, route, body, headers, right in cases:
            before = counted()
            r = await c.post(
                srv.url + route, content=encode(body), headers={"content-type": "application/json", **headers}
            )
            try:
                strict_json(r.text)
                valid = True
            except ValueError:
                valid = False
            out.append(
                {
                    "probe": name,
                    "route": route,
                    "status": r.status_code,
                    "expected": list(right),
                    "ok": r.status_code in right and valid,
                    "strict_json": valid,
                    "counted": counted() - before,
                }
            )
    return out


async def slow_body(url: str, connections: int, gap_s: float, give_up_s: float = 120.0) -> dict:
    """`connections` sockets each send headers announcing a 400-byte JSON body, then one byte every `gap_s` s
    (never a stall long enough for the per-read timeout). Per connection: was it cut (an answer or a close
    before `give_up_s`), the status it got, after how long. Meanwhile one ordinary /predict: still served?"""
    host, port = url.rsplit("/", 1)[1].split(":")

    async def one() -> dict:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 400\r\n\r\n".encode()
        )
        await writer.drain()
        t0, sent = time.perf_counter(), 0
        answer = asyncio.create_task(reader.readline())
        while time.perf_counter() - t0 < give_up_s:
            done, _ = await asyncio.wait({answer}, timeout=gap_s)
            if done:
                break
            try:
                writer.write(b" ")
                await writer.drain()
                sent += 1
            except ConnectionError:
                break
        try:
            line = await asyncio.wait_for(answer, 5)
            status = (
                int(line.split()[1]) if line.startswith(b"HTTP/") else ("closed" if not line else "other")
            )
        except (TimeoutError, ConnectionError, IndexError, ValueError):
            status = None  # still open: not cut
        seconds = time.perf_counter() - t0
        answer.cancel()
        writer.close()
        return {"status": status, "seconds": seconds, "bytes": sent}

    async def ordinary() -> dict:
        await asyncio.sleep(gap_s)  # once every dripping connection is open
        async with httpx.AsyncClient(timeout=600) as c:
            t = time.perf_counter()
            r = await c.post(url + "/predict", json={**BODY, "samples": 2})
            return {"status": r.status_code, "seconds": round(time.perf_counter() - t, 2)}

    res, served = await asyncio.gather(asyncio.gather(*[one() for _ in range(connections)]), ordinary())
    cut = [x for x in res if x["status"] is not None]
    secs = sorted(x["seconds"] for x in cut)
    statuses = [str(x["status"]) for x in res]
    return {
        "connections": connections,
        "gap_s": gap_s,
        "give_up_s": give_up_s,
        "cut": len(cut),
        "statuses": {k: statuses.count(k) for k in sorted(set(statuses))},
        "seconds_to_cut": (
            {"min": round(secs[0], 1), "median": round(secs[len(secs) // 2], 1), "max": round(secs[-1], 1)}
            if secs
            else None
        ),
        "bytes_sent_max": max(x["bytes"] for x in res),
        "predict_during": served,
    }


def fuzz_section() -> dict:
    """route → {cases, status_5xx, invalid_json} from bench/results/fuzz.json (python -m bench.fuzz: every
    route's schema with hostile values, through the real app on a fake backend)."""
    f = json.loads((ROOT / "bench" / "results" / "fuzz.json").read_text())
    routes = {
        route: {"cases": r["cases"], "status_5xx": r["status_5xx"], "invalid_json": r["invalid_json"]}
        for route, r in f["fuzz"].items()
    }
    return {"command": f["command"], "date": f["machine"]["date"], "routes": routes}


async def _read_stream(c: httpx.AsyncClient, url: str, body: dict) -> dict:
    events, error = [], False
    try:
        async with c.stream("POST", url, json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    error = error or '"error"' in line[6:]
        how = "done" if events and events[-1] == "[DONE]" else "cut"
    except httpx.HTTPError as exc:
        how = f"cut ({type(exc).__name__})"
    return {"events": len(events), "ended": how, "error_event": error}


async def drain(srv: ServerProcess) -> dict:
    """SIGTERM with six /predict requests in flight and two chat streams open: the requests should complete,
    each stream end with [DONE] (after an error event if it was cut short), never a cut body."""
    chat = {
        "model": M,
        "messages": [{"role": "user", "content": "Tell me about the Sun."}],
        "max_tokens": 200,
    }
    async with httpx.AsyncClient(timeout=600) as c:
        tasks = [asyncio.create_task(c.post(srv.url + "/predict", json=BODY)) for _ in range(6)]
        streams = [
            asyncio.create_task(
                _read_stream(c, srv.url + "/v1/chat/completions", {**chat, "stream": True, "seed": i})
            )
            for i in range(2)
        ]
        await asyncio.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        res = await asyncio.gather(*tasks, return_exceptions=True)
        st = await asyncio.gather(*streams)
    ok = sum(1 for r in res if not isinstance(r, Exception) and r.status_code == 200)
    return {
        "in_flight_at_sigterm": len(tasks),
        "completed_200": ok,
        "exit_code": srv.proc.wait(120),
        "streams_open_at_sigterm": len(st),
        "streams": st,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--queue-rows", type=int, default=40)
    ap.add_argument("--burst", type=int, default=160, help="requests in the over-deadline burst")
    ap.add_argument("--slow-connections", type=int, default=200, help="connections dripping a body")
    ap.add_argument("--slow-gap", type=float, default=5.0, help="seconds between the dripped bytes")
    ap.add_argument(
        "--burst-timeout",
        type=float,
        default=30,
        help="request deadline (s) of the server that runs the poison, unload, chunked and burst probes (short "
        "enough that the burst cannot all finish within it on an idle 2-core machine)",
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
        new = {
            k: ran[k] for k in ("poison", "unload", "chunked", "overload", "probes", "slow_body") if k in ran
        }
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
            pr = asyncio.run(probes(srv3))
            sb = asyncio.run(slow_body(srv3.url, a.slow_connections, a.slow_gap))
            p = asyncio.run(poison(srv3.url))
            u = asyncio.run(unload(srv3.url))
            ch = asyncio.run(chunked(srv3.url))
            b = asyncio.run(burst(srv3.url, a.burst))
        finally:
            srv3.stop()
        new = {"poison": p, "unload": u, "chunked": ch, "overload": b, "probes": pr, "slow_body": sb}
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
        new.setdefault("probes", prev.get("probes", []))
        new.setdefault("slow_body", prev.get("slow_body"))
    else:
        srv = ServerProcess(
            d,
            "arc-easy-dalorra",
            d / "soak.log",
            DALORRA_MAX_QUEUE_ROWS=str(a.queue_rows),
            DALORRA_MAX_BATCH_ROWS="40",
            DALORRA_RESULT_CACHE_SIZE="0",  # every request is scored: the soak is of scoring, not of cache hits
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
        f"{a.queue_rows} rows (≈ {a.clients * 10 // a.queue_rows}× what the queue admits), result cache off",
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
        f"exit code {dr['exit_code']} (uvicorn re-raises SIGTERM after its graceful shutdown: -15)."
        + _streams_line(dr),
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
    fz = fuzz_section()
    table += _new_probes_table(new, fz)
    table += _safety_table(new, before, a)
    write(
        "reliability",
        {"soak": s, "hot_load": h, "drain": dr, **new, "fuzz": fz, "before": before, "settings": vars(a)},
        "\n".join(table),
    )


def _streams_line(dr: dict) -> str:
    st = dr.get("streams")
    if not st:
        return ""
    ends = ", ".join(
        f"{x['ended']} after {x['events']} events{' (error event)' if x['error_event'] else ''}" for x in st
    )
    return f" Streams open at SIGTERM: {ends}."


def _new_probes_table(new: dict, fz: dict) -> list[str]:
    """Issue #28: the defects it found, dripping bodies, and the fuzz counts per route."""
    out = ["", "## The defects of issue #28, sent to the real server", ""]
    out += ["| probe | route | status | strict JSON | counted | right |", "|---|---|---|---|---|---|"]
    for x in new.get("probes") or []:
        out.append(
            f"| {x['probe']} | `{x['route']}` | {x['status']} | {'yes' if x['strict_json'] else 'no'} | "
            f"{x['counted']:.0f} | {'yes' if x['ok'] else '**no**'} |"
        )
    out += [
        "",
        "`counted`: how much the outcome counters (dalorra_requests_total, dalorra_generation_requests_total, "
        "dalorra_feedback_total) moved; admin refusals are logged, not counted as predictions.",
    ]
    sb = new.get("slow_body")
    if sb:
        cut = sb["seconds_to_cut"] or {}
        out += [
            "",
            f"## Slow bodies: {sb['connections']} connections dripping one byte every {sb['gap_s']:.0f} s",
            "",
            f"{sb['cut']} of {sb['connections']} cut (statuses {sb['statuses']}), after "
            f"{cut.get('min')}–{cut.get('max')} s (median {cut.get('median')} s); at most {sb['bytes_sent_max']} "
            f"bytes sent on one. A /predict sent meanwhile: {sb['predict_during']['status']} in "
            f"{sb['predict_during']['seconds']} s. No read stalls past the 10 s per-read limit; the overall "
            "budget (10 s + 1 s per KiB received, server/guards.py) ends them.",
        ]
    routes = fz["routes"]
    out += [
        "",
        f"## Fuzzing every route (`{fz['command']}`, {fz['date']}; bench/results/fuzz.md)",
        "",
        "| route | cases | status ≥ 500 | invalid JSON / SSE |",
        "|---|---|---|---|",
    ]
    out += [f"| `{k}` | {v['cases']} | {v['status_5xx']} | {v['invalid_json']} |" for k, v in routes.items()]
    return out


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
        (
            f"Before: {before.get('command')} ({before.get('date', '')}), the server before the change, run from "
            f"a git worktree of its commit with this script copied in. After: {a.after_command}."
            if before
            else f"No `--before` run given: the before column is empty. After: {a.after_command}."
        ),
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
