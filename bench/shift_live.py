"""The shift monitor live, over HTTP (issue 26, "Live"): a real server, in-distribution traffic, then shifted traffic.

    python -m bench.shift_live [--adapter-dir DIR] [--warm 300] [--shifted 300] [--calm 1000]
        [--shift-sets mmlu_conceptual_physics/test winogrande/dev boolq/validation]

One shift phase per --shift-sets entry, each on a fresh server (a fresh test period): --warm in-distribution
requests (ARC-Easy *test* items: the adapter's calibration items come from its training file, and the policy was
chosen on validation), then the shifted set's items until the monitor raises its alarm or --shifted run out:
requests until the alarm. MMLU conceptual physics has ARC's K = 4, so K alone does not give that shift away;
WinoGrande (K = 2) is the task shift where confidence points the wrong way; BoolQ (K = 2) the one answered
confidently and wrongly with no request looking unusual. Then a calm phase, another fresh
server, sends --calm in-distribution requests: alarms raised (the guarantee: at most DALORRA_SHIFT_ALPHA per test
period). In each phase the label-free accuracy estimate (average thresholded confidence over the monitor's
window, or mean confidence for a record without the ATC threshold) is set beside the true accuracy of the same
window. Writes bench/results/shift_live.{json,md} and replaces the `live_` targets in bench/results/shift.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from adapters.data import load_jsonl
from bench.common import RESULTS, write
from bench.loopback import ServerProcess

REPO = Path(__file__).resolve().parents[1]


def serve(adapters: Path, name: str, work: Path, tag: str, alpha: float) -> ServerProcess:
    return ServerProcess(
        adapters,
        name,
        work / f"server-{tag}.log",
        DALORRA_RESULT_CACHE_SIZE="0",  # every request is scored and seen by the monitor
        DALORRA_SHIFT_ALPHA=str(alpha),
        DALORRA_REQUEST_TIMEOUT_S="600",
    ).wait_ready()


def stream(srv: ServerProcess, name: str, items, stop_on_alarm: bool = False) -> dict:
    """Send the items one at a time; after each, read the monitor. Returns per-request rows and the requests the
    server refused with a 4xx (they are not scored, so the monitor never sees them)."""
    rows, refused = [], []
    with httpx.Client(timeout=600) as c:
        for it in items:
            body = {"question": it.question, "choices": list(it.choices), "adapter": name}
            r = c.post(srv.url + "/predict", json=body)
            # refused with a clear error (e.g. longer than the model's context): not scored, not monitored
            if r.status_code in (413, 422):
                refused.append({"status": r.status_code, "error": r.json().get("error", {}).get("message")})
                continue
            r.raise_for_status()
            p = r.json()
            st = c.get(f"{srv.url}/v1/adapters/{name}").json()["shift"]
            rows.append(
                {
                    "correct": p["answer_index"] == it.label,
                    "confidence": p["confidence"],
                    "decision": p["decision"],
                    "reason": p["abstain_reason"],
                    "unfamiliarity": p["unfamiliarity"],
                    "statistic": st["statistic"],
                    "alarm": st["alarm"],
                    "alarm_by": st.get("alarm_by"),
                    "accuracy_estimate": st["accuracy_estimate"],
                    "accuracy_estimate_method": st.get("accuracy_estimate_method"),
                }
            )
            if stop_on_alarm and st["alarm"]:
                break
    return {"rows": rows, "refused": refused}


def window_accuracy(rows: list[dict], window: int) -> dict:
    last = rows[-window:]
    if not last:
        return {"true_accuracy": None, "estimate": None, "n": 0}
    return {
        "true_accuracy": sum(r["correct"] for r in last) / len(last),
        "estimate": last[-1]["accuracy_estimate"],
        "n": len(last),
    }


def window_gaps(rows: list[dict], window: int) -> dict:
    """The estimate's error over every full window of a phase: at each request from the `window`-th on, the
    monitor's estimate minus the true accuracy of the same last `window` requests. The mean is the estimate's bias;
    one window's gap also carries the window's sampling noise (sd ≈ √(a(1 − a)/window), ≈ 0.03 at 200)."""
    c = [float(r["correct"]) for r in rows]
    gaps = [
        rows[i]["accuracy_estimate"] - sum(c[i - window + 1 : i + 1]) / window
        for i in range(window - 1, len(rows))
        if rows[i]["accuracy_estimate"] is not None
    ]
    if not gaps:
        return {"windows": 0, "mean": None, "mean_abs": None, "min": None, "max": None}
    return {
        "windows": len(gaps),
        "mean": sum(gaps) / len(gaps),
        "mean_abs": sum(abs(g) for g in gaps) / len(gaps),
        "min": min(gaps),
        "max": max(gaps),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter-dir", type=Path, default=REPO / "adapters" / "default" / "arc-easy-dalorra")
    ap.add_argument("--warm", type=int, default=300, help="in-distribution requests before each shift")
    ap.add_argument("--shifted", type=int, default=300, help="shifted requests at most (stops at the alarm)")
    ap.add_argument(
        "--calm", type=int, default=1000, help="in-distribution requests of the false-alarm phase"
    )
    ap.add_argument(
        "--shift-sets",
        nargs="+",
        default=["mmlu_conceptual_physics/test", "winogrande/dev", "boolq/validation"],
        help="one shift phase per set (a fresh server each): MMLU has ARC's K = 4, WinoGrande and BoolQ K = 2 "
        "(BoolQ: answered confidently and wrongly, the hard case)",
    )
    ap.add_argument("--alpha", type=float, default=0.01, help="DALORRA_SHIFT_ALPHA")
    ap.add_argument("--window", type=int, default=200, help="DALORRA_SHIFT_WINDOW (accuracy estimate)")
    a = ap.parse_args()
    os.environ["DALORRA_SHIFT_WINDOW"] = str(a.window)
    work = Path(tempfile.mkdtemp(prefix="dalorra-shift-live-"))
    adapters = work / "adapters"
    adapters.mkdir()
    name = a.adapter_dir.name
    shutil.copytree(a.adapter_dir, adapters / name)
    ind = load_jsonl("arc_easy/test", limit=a.warm + a.calm)
    id_k = sorted({len(it.choices) for it in ind})
    t0 = time.time()
    shifts = {}
    for k, shift_set in enumerate(a.shift_sets):
        shifted = load_jsonl(shift_set)[: a.shifted]
        srv = serve(adapters, name, work, f"shift{k}", a.alpha)
        try:
            if srv_shift(srv, name) is None:
                raise SystemExit(
                    f"adapter {name} stores no calibration reference: run dalorra recalibrate first"
                )
            warm = stream(srv, name, ind[: a.warm])["rows"]
            got = stream(srv, name, shifted, stop_on_alarm=True)
            after = got["rows"]
        finally:
            srv.stop()
        shifts[shift_set] = {
            "K": sorted({len(it.choices) for it in shifted}),
            "requests": {"warm": len(warm), "shifted": len(after)},
            "refused": got["refused"],
            "alarm_during_warm_at": next((i + 1 for i, r in enumerate(warm) if r["alarm"]), None),
            "requests_until_alarm": next((i + 1 for i, r in enumerate(after) if r["alarm"]), None),
            "alarm_by": next((r["alarm_by"] for r in after if r["alarm"]), None),
            "phases": {
                "in_distribution_before_shift": window_accuracy(warm, a.window),
                "shifted": window_accuracy(after, a.window),
            },
            "abstain_share": {k2: _share(v, "abstain") for k2, v in (("warm", warm), ("shifted", after))},
            "unfamiliar_share": {k2: _unfamiliar(v) for k2, v in (("warm", warm), ("shifted", after))},
            "trace": {"warm": warm, "shifted": after},
        }
    srv = serve(adapters, name, work, "calm", a.alpha)
    try:
        calm = stream(srv, name, ind[a.warm : a.warm + a.calm])["rows"]
    finally:
        srv.stop()
    calm_alarm = next((i + 1 for i, r in enumerate(calm) if r["alarm"]), None)
    calm_phase = window_accuracy(calm, a.window)
    calm_gaps = window_gaps(calm, a.window)
    warm_alarms = sum(v["alarm_during_warm_at"] is not None for v in shifts.values())
    id_requests = sum(v["requests"]["warm"] for v in shifts.values()) + len(calm)
    data = {
        "adapter": name,
        "alpha": a.alpha,
        "window": a.window,
        "accuracy_estimate_method": calm[-1].get("accuracy_estimate_method") if calm else None,
        "shifts": shifts,
        "calm": {
            "requests": len(calm),
            "alarm_at": calm_alarm,
            "phase": calm_phase,
            "estimate_gap_over_windows": calm_gaps,
            "abstain_share": _share(calm, "abstain"),
            "unfamiliar_share": _unfamiliar(calm),
            "trace": calm,
        },
        "seconds": time.time() - t0,
    }
    gap = abs(calm_phase["estimate"] - calm_phase["true_accuracy"])
    targets = {
        f"live_alarm_on_shift_{_slug(s)}": {
            "value": v["requests_until_alarm"],
            "goal": f"alarm within {a.shifted} shifted requests ({v['requests']['shifted']} sent; K = {v['K']})",
            "met": v["requests_until_alarm"] is not None,
        }
        for s, v in shifts.items()
    }
    targets["live_no_false_alarm_in_distribution"] = {
        "value": int(calm_alarm is not None) + warm_alarms,
        "goal": f"0 alarms over {id_requests} in-distribution requests in {len(shifts) + 1} test periods "
        f"(guarantee: P ≤ {a.alpha} per period)",
        "met": calm_alarm is None and warm_alarms == 0,
    }
    targets["live_accuracy_estimate_bias_in_distribution"] = {
        "value": calm_gaps["mean"],
        "goal": f"mean within ±0.05 (estimate minus true accuracy of the same last {a.window} requests, averaged over "
        f"the calm phase's {calm_gaps['windows']} windows; the last window alone: {gap:.3f}, mean absolute gap "
        f"{calm_gaps['mean_abs'] if calm_gaps['mean_abs'] is None else round(calm_gaps['mean_abs'], 3)})",
        "met": calm_gaps["mean"] is not None and abs(calm_gaps["mean"]) <= 0.05,
    }
    data["targets"] = targets
    lines = [
        f"Adapter {name}; monitor alarm level {a.alpha}; accuracy estimate: {data['accuracy_estimate_method']} over "
        f"the last {a.window} requests. Each shift phase is a fresh server: {a.warm} in-distribution requests "
        f"(ARC-Easy test), then the shifted set until the alarm (at most {a.shifted}); the calm phase is another "
        f"fresh server with {a.calm} in-distribution requests.",
        "",
        "| phase | K | requests | alarm after | raised by | true accuracy (last window) | label-free estimate | abstain share | unfamiliar share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v: "–" if v is None else str(v)  # noqa: E731
    g = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for s, v in shifts.items():
        for ph, key in (("in_distribution_before_shift", "warm"), ("shifted", "shifted")):
            w = v["phases"][ph]
            alarm = v["alarm_during_warm_at"] if key == "warm" else v["requests_until_alarm"]
            lines.append(
                f"| {s}: {ph} | {id_k if key == 'warm' else v['K']} | {v['requests'][key]} | {f(alarm)} | "
                f"{f(v.get('alarm_by') if key == 'shifted' else None)} | "
                f"{g(w['true_accuracy'])} | {g(w['estimate'])} | {v['abstain_share'][key]:.3f} | "
                f"{v['unfamiliar_share'][key]:.3f} |"
            )
    lines.append(
        f"| calm: in-distribution only | {id_k} | {len(calm)} | {f(calm_alarm)} | – | {calm_phase['true_accuracy']:.3f} | "
        f"{calm_phase['estimate']:.3f} | {data['calm']['abstain_share']:.3f} | {data['calm']['unfamiliar_share']:.3f} |"
    )
    for s_, v in shifts.items():
        if v["refused"]:
            lines.append(
                f"\n{len(v['refused'])} {s_} request(s) refused by the server and not sent to the monitor: "
                + "; ".join(sorted({f"{r['status']} {r['error']}" for r in v["refused"]}))
            )
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [
        f"| {k} | {f(round(v['value'], 3) if isinstance(v['value'], float) else v['value'])} | {v['goal']} | "
        f"{'yes' if v['met'] else '**no**'} |"
        for k, v in targets.items()
    ]
    write("shift_live", data, "\n".join(lines))
    main_file = RESULTS / "shift.json"
    if main_file.is_file():  # the one targets table: replace the live rows beside the offline ones
        d = json.loads(main_file.read_text())
        d["targets"] = {k: v for k, v in (d.get("targets") or {}).items() if not k.startswith("live_")}
        d["targets"].update(targets)
        tmp = main_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(d, indent=2, default=float))
        os.replace(tmp, main_file)
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


def _share(rows: list[dict], decision: str) -> float:
    return sum(r["decision"] == decision for r in rows) / max(1, len(rows))


def _unfamiliar(rows: list[dict]) -> float:
    return sum(r["unfamiliarity"] < 0.05 for r in rows) / max(1, len(rows))


def _slug(shift_set: str) -> str:
    return shift_set.split("/")[0]


def srv_shift(srv: ServerProcess, name: str) -> dict | None:
    return httpx.get(f"{srv.url}/v1/adapters/{name}").json().get("shift")


if __name__ == "__main__":
    main()
