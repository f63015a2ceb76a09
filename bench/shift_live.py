"""The shift monitor live, over HTTP (issue 26, "Live"): a real server, in-distribution traffic, then shifted traffic.

    python -m bench.shift_live [--adapter-dir DIR] [--warm 300] [--shifted 300] [--calm 1000] [--shift-set NAME]

Phase 1 sends --warm in-distribution requests (ARC-Easy *test* items: the adapter's calibration items come from its
training file, and the policy was chosen on validation) and then --shift-set items (4-choice MMLU by default, the
same K as ARC, so K alone does not give the shift away) until the monitor raises its alarm or --shifted run out:
requests until the alarm. Phase 2 restarts the server (a fresh test period) and sends --calm in-distribution
requests: alarms raised (the guarantee: at most DALORRA_SHIFT_ALPHA of such runs). In each phase the label-free
accuracy estimate (average thresholded confidence over the monitor's window) is set beside the true accuracy of the
same window. Writes bench/results/shift_live.{json,md} and adds its `live_` targets to bench/results/shift.json.
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
    """Send the items one at a time; after each, read the monitor. Returns per-request rows."""
    rows = []
    with httpx.Client(timeout=600) as c:
        for it in items:
            body = {"question": it.question, "choices": list(it.choices), "adapter": name}
            r = c.post(srv.url + "/predict", json=body)
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
                    "accuracy_estimate": st["accuracy_estimate"],
                }
            )
            if stop_on_alarm and st["alarm"]:
                break
    return {"rows": rows}


def window_accuracy(rows: list[dict], window: int) -> dict:
    last = rows[-window:]
    return {
        "true_accuracy": sum(r["correct"] for r in last) / len(last),
        "estimate": last[-1]["accuracy_estimate"],
        "n": len(last),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter-dir", type=Path, default=REPO / "adapters" / "default" / "arc-easy-dalorra")
    ap.add_argument("--warm", type=int, default=300, help="in-distribution requests before the shift")
    ap.add_argument("--shifted", type=int, default=300, help="shifted requests at most (stops at the alarm)")
    ap.add_argument(
        "--calm", type=int, default=1000, help="in-distribution requests of the false-alarm phase"
    )
    ap.add_argument("--shift-set", default="mmlu_conceptual_physics/test")
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
    shifted = [it for it in load_jsonl(a.shift_set) if len(it.choices) == 4][: a.shifted]
    t0 = time.time()
    srv = serve(adapters, name, work, "phase1", a.alpha)
    try:
        if srv_shift(srv, name) is None:
            raise SystemExit(f"adapter {name} stores no calibration reference: run dalorra recalibrate first")
        warm = stream(srv, name, ind[: a.warm])["rows"]
        after = stream(srv, name, shifted, stop_on_alarm=True)["rows"]
    finally:
        srv.stop()
    srv = serve(adapters, name, work, "phase2", a.alpha)
    try:
        calm = stream(srv, name, ind[a.warm : a.warm + a.calm])["rows"]
    finally:
        srv.stop()
    alarmed_warm = next((i + 1 for i, r in enumerate(warm) if r["alarm"]), None)
    until = next((i + 1 for i, r in enumerate(after) if r["alarm"]), None)
    calm_alarm = next((i + 1 for i, r in enumerate(calm) if r["alarm"]), None)
    phases = {
        "in_distribution_before_shift": window_accuracy(warm, a.window),
        "shifted": window_accuracy(after, a.window),
        "in_distribution_calm": window_accuracy(calm, a.window),
    }
    data = {
        "adapter": name,
        "shift_set": a.shift_set,
        "alpha": a.alpha,
        "window": a.window,
        "requests": {"warm": len(warm), "shifted": len(after), "calm": len(calm)},
        "alarm_during_warm_at": alarmed_warm,
        "requests_until_alarm": until,
        "calm_alarm_at": calm_alarm,
        "phases": phases,
        "abstain_share": {
            k: sum(r["decision"] == "abstain" for r in v) / max(1, len(v))
            for k, v in (("warm", warm), ("shifted", after), ("calm", calm))
        },
        "unfamiliar_share": {
            k: sum(r["unfamiliarity"] < 0.05 for r in v) / max(1, len(v))
            for k, v in (("warm", warm), ("shifted", after), ("calm", calm))
        },
        "seconds": time.time() - t0,
        "trace": {"warm": warm, "shifted": after, "calm": calm},
    }
    targets = {
        "live_alarm_on_shift": {
            "value": until,
            "goal": f"alarm within {a.shifted} shifted requests",
            "met": until is not None,
        },
        "live_no_false_alarm_in_distribution": {
            "value": int(calm_alarm is not None) + int(alarmed_warm is not None),
            "goal": f"0 alarms over {len(warm) + len(calm)} in-distribution requests (guarantee: P ≤ {a.alpha})",
            "met": calm_alarm is None and alarmed_warm is None,
        },
        "live_accuracy_estimate_gap_in_distribution": {
            "value": abs(
                phases["in_distribution_calm"]["estimate"] - phases["in_distribution_calm"]["true_accuracy"]
            ),
            "goal": "<= 0.05",
            "met": abs(
                phases["in_distribution_calm"]["estimate"] - phases["in_distribution_calm"]["true_accuracy"]
            )
            <= 0.05,
        },
    }
    data["targets"] = targets
    lines = [
        "| phase | requests | true accuracy (last window) | label-free estimate | abstain share | unfamiliar share |",
        "|---|---|---|---|---|---|",
    ]
    for (k, v), key in zip(phases.items(), ("warm", "shifted", "calm"), strict=True):
        lines.append(
            f"| {k} | {data['requests'][key]} | {v['true_accuracy']:.3f} | {v['estimate']:.3f} | "
            f"{data['abstain_share'][key]:.3f} | {data['unfamiliar_share'][key]:.3f} |"
        )
    lines += [
        "",
        f"Requests until the alarm after the shift to {a.shift_set}: {until} (of at most {a.shifted}); alarms "
        f"during the {len(warm)} + {len(calm)} in-distribution requests: "
        f"{targets['live_no_false_alarm_in_distribution']['value']} (alpha {a.alpha}).",
        "",
        "| target | value | goal | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['value']} | {v['goal']} | {'yes' if v['met'] else 'no'} |" for k, v in targets.items()
    ]
    write("shift_live", data, "\n".join(lines))
    main_file = RESULTS / "shift.json"
    if main_file.is_file():  # the one targets table: add the live rows beside the offline ones
        d = json.loads(main_file.read_text())
        d.setdefault("targets", {}).update(targets)
        tmp = main_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(d, indent=2, default=float))
        os.replace(tmp, main_file)
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


def srv_shift(srv: ServerProcess, name: str) -> dict | None:
    return httpx.get(f"{srv.url}/v1/adapters/{name}").json().get("shift")


if __name__ == "__main__":
    main()
