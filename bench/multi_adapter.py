"""Many adapters on one base, one scheduler, bf16 (issue: one base model for many adapters).

    python -m bench.multi_adapter [--sections memory throughput latency dtype serving] [--quick]

Sections (each cached under --work, so a run can be resumed or one section re-run):
  memory      a real server process: resident memory (VmRSS) with 1, 4 and 16 adapters loaded (copies of the
              default adapter under other names), and the time of each hot load (POST /v1/adapters/{name}/load)
  throughput  the same server, concurrency 8, S = 10: traffic spread evenly over 8 adapters vs all on one
  latency     a /predict (S = 10, one at a time) alone, and beside a long generation with its uncertainty pass
              (a ~600-word prompt, 16 samples): p50/p99 latency
  dtype       in process (the HF backend as the server runs it), ARC-Easy validation, bf16 vs float32 on this
              CPU: S = 10 and deterministic (S = 1, mean mask) throughput, equal decisions, max |Δp|, rank
              correlation of MI
  serving     the serving goals in one run: S = 10, adaptive ≤ 10 and one deterministic answer through a bf16
              server, a deterministic answer through a float32 server, and the naive PEFT loop (--top-adapter:
              also a top-L adapter at S = 10 and adaptive, the headline's second row)
  adaptive    adaptive sampling's decisions against S = 10 on all ARC-Easy validation items, its rounds replayed
              on prefixes of the same bf16 draws
Writes bench/results/multi_adapter.{json,md} with a `targets` object (name → {value, goal, met}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from adapters.data import load_jsonl
from bench.common import write
from bench.loopback import ServerProcess
from bench.serve_efficiency import DEFAULT, level, make_variants, naive_loop, pct

N_ADAPTERS = 16


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def adapters_root(work: Path) -> Path:
    """16 adapters: the default adapter under 16 names (each loads its own factors)."""
    root = work / "adapters"
    if not root.is_dir():
        tmp = work / ".adapters"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(N_ADAPTERS):
            shutil.copytree(DEFAULT, tmp / f"a{i:02d}")
        make_variants(tmp / "variants", None)
        for name in ("mean", "default"):
            shutil.copytree(tmp / "variants" / name, tmp / name)
        shutil.rmtree(tmp / "variants")
        os.replace(tmp, root)
    return root


def server(work: Path, dtype: str, **env: str) -> ServerProcess:
    return ServerProcess(
        adapters_root(work),
        "a00",
        work / f"server-{dtype}.log",
        DALORRA_DTYPE=dtype,
        DALORRA_RESULT_CACHE_SIZE="0",  # measures scoring, not cache hits
        DALORRA_REQUEST_TIMEOUT_S="900",
        DALORRA_MAX_QUEUE_ROWS="100000",
        **env,
    ).wait_ready()


def load(url: str, name: str) -> float:
    t = time.perf_counter()
    r = httpx.post(f"{url}/v1/adapters/{name}/load", json={}, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - t


def touch(url: str, names: list[str], item) -> None:
    """One small request per adapter, so its memory is in use when RSS is read."""
    for n in names:
        body = {"question": item.question, "choices": list(item.choices), "adapter": n, "samples": 2}
        httpx.post(url + "/predict", json=body, timeout=300).raise_for_status()


# ---- sections -------------------------------------------------------------------------------------------
def sec_memory(work: Path, a) -> dict:
    items = load_jsonl("arc_easy/validation", limit=4)
    srv = server(work, a.dtype)
    try:
        pid = srv.proc.pid
        touch(srv.url, ["a00"], items[0])
        rss = {1: rss_bytes(pid)}
        loads = []
        for i in range(1, N_ADAPTERS):
            loads.append(load(srv.url, f"a{i:02d}"))
            if i + 1 in (4, N_ADAPTERS):
                touch(srv.url, [f"a{j:02d}" for j in range(i + 1)], items[0])
                rss[i + 1] = rss_bytes(pid)
        info = httpx.get(srv.url + "/v1/adapters/a00").json()
    finally:
        srv.stop()
    return {
        "dtype": a.dtype,
        "rss_bytes": rss,
        "rss_ratio_4": rss[4] / rss[1],
        "rss_ratio_16": rss[N_ADAPTERS] / rss[1],
        "per_extra_adapter_bytes": (rss[N_ADAPTERS] - rss[1]) / (N_ADAPTERS - 1),
        "adapter_files_bytes": sum(f.stat().st_size for f in DEFAULT.iterdir()),
        "load_seconds": loads,
        "load_seconds_median": statistics.median(loads),
        "load_seconds_max": max(loads),
        "adapter_rank": info.get("rank"),
    }


def sec_throughput(work: Path, a) -> dict:
    items = load_jsonl("arc_easy/validation", limit=64)
    srv = server(work, a.dtype, DALORRA_PRELOAD=json.dumps([f"a{i:02d}" for i in range(1, 8)]))
    try:
        asyncio.run(level(srv.url, items, "a00", 4, 2, 4))  # warm-up
        out = {}
        for _ in range(a.repeats):  # alternate, so the CPU's drift hits both
            one = asyncio.run(level(srv.url, items, "a00", 10, 8, a.requests))
            mix = asyncio.run(level(srv.url, items, [f"a{i:02d}" for i in range(8)], 10, 8, a.requests))
            one.pop("_answers")
            mix.pop("_answers")
            out.setdefault("one", []).append(one)
            out.setdefault("spread", []).append(mix)
    finally:
        srv.stop()
    q = {k: statistics.mean(r["throughput_qps"] for r in v) for k, v in out.items()}
    return {
        "dtype": a.dtype,
        "samples": 10,
        "concurrency": 8,
        "requests": a.requests,
        "repeats": a.repeats,
        "runs": out,
        "one_adapter_qps": q["one"],
        "eight_adapters_qps": q["spread"],
        "ratio": q["spread"] / q["one"],
    }


def long_prompt(words: int = 600) -> str:
    items = load_jsonl("arc_easy/train", limit=200)
    text, n = [], 0
    for it in items:
        text.append(it.question)
        n += len(it.question.split())
        if n >= words:
            break
    return "Read these questions and summarise what they ask about.\n" + "\n".join(text)


def sec_latency(work: Path, a) -> dict:
    items = load_jsonl("arc_easy/validation", limit=64)
    srv = server(work, a.dtype)
    prompt = long_prompt()
    gen_body = {"model": "a00", "prompt": prompt, "max_tokens": 24, "samples": 16, "temperature": 0}
    stop = threading.Event()
    gens: list[dict] = []

    def generate_forever() -> None:
        with httpx.Client(timeout=1200) as c:
            while not stop.is_set():
                t = time.perf_counter()
                r = c.post(srv.url + "/v1/completions", json=gen_body)
                gens.append({"status": r.status_code, "seconds": time.perf_counter() - t})

    def predicts(n: int) -> list[float]:
        lat = []
        with httpx.Client(timeout=1200) as c:
            for i in range(n):
                it = items[i % len(items)]
                body = {"question": it.question, "choices": list(it.choices), "samples": 10, "seed": i}
                t = time.perf_counter()
                c.post(srv.url + "/predict", json=body).raise_for_status()
                lat.append(time.perf_counter() - t)
        return lat

    try:
        predicts(3)  # warm-up
        alone = predicts(a.latency_requests)
        th = threading.Thread(target=generate_forever, daemon=True)
        th.start()
        time.sleep(2.0)  # the generation is decoding or in its uncertainty pass
        beside = predicts(a.latency_requests)
        stop.set()
        th.join(timeout=600)
        alone2 = predicts(a.latency_requests // 2)  # alone again: the CPU's drift
    finally:
        srv.stop()
    alone_all = alone + alone2
    return {
        "dtype": a.dtype,
        "prompt_words": len(prompt.split()),
        "generation": gen_body | {"prompt": f"<{len(prompt)} characters>"},
        "generations": gens,
        "alone": {"p50_s": pct(alone_all, 0.5), "p99_s": pct(alone_all, 0.99), "n": len(alone_all)},
        "beside": {"p50_s": pct(beside, 0.5), "p99_s": pct(beside, 0.99), "n": len(beside)},
        "p50_ratio": pct(beside, 0.5) / pct(alone_all, 0.5),
        "p99_ratio": pct(beside, 0.99) / pct(alone_all, 0.99),
    }


def sec_dtype(work: Path, a) -> dict:
    """In process: the HF backend (as the server runs it) in float32 and bf16 on ARC-Easy validation."""
    from scipy.stats import spearmanr

    from adapters.basemodel import cpu_has_bf16
    from adapters.decision import DecisionPolicy
    from adapters.uncertainty import summarize
    from server.backend import ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    items = load_jsonl("arc_easy/validation", limit=a.dtype_items)
    rec = json.loads((DEFAULT / "dalorra.json").read_text())
    policy = DecisionPolicy.from_record(rec.get("decision"))
    T = float(rec.get("temperature", 1.0))
    root = adapters_root(work)
    out: dict = {"items": len(items), "cpu_has_bf16": cpu_has_bf16()}
    backends = {}
    for dtype in (
        "float32",
        "bfloat16",
    ):  # both in this process; chunks alternate, so the CPU's drift hits both
        be = HFBackend(Settings(dtype=dtype, threads=a.threads))
        be.load_adapter("d", str(root / "a00"))
        be.load_adapter("m", str(root / "mean"))
        be.score([ScoreRequest("d", it.question, it.choices, None, 2, 0) for it in items[:4]])  # warm-up
        backends[dtype] = be
    res: dict[str, dict] = {
        k: {"d": {"seconds": 0.0, "logits": []}, "m": {"seconds": 0.0, "logits": []}} for k in backends
    }
    for name, S in (("d", 10), ("m", 1)):
        reqs = [ScoreRequest(name, it.question, it.choices, None, S, 0) for it in items]
        for i in range(0, len(reqs), 16):  # backend-sized calls, as the scheduler makes them
            for dtype, be in backends.items():
                t0 = time.perf_counter()
                scored = be.score(reqs[i : i + 16])
                res[dtype][name]["seconds"] += time.perf_counter() - t0
                res[dtype][name]["logits"] += [x.logits for x in scored]
            print(f"dtype: {name} S={S} {i + 16}/{len(reqs)}", flush=True)
    f32, b16 = res["float32"]["d"]["logits"], res["bfloat16"]["d"]["logits"]
    same, dp, mi32, mi16 = 0, 0.0, [], []
    for x, y in zip(f32, b16, strict=True):
        sx, sy = (summarize(v[:, None, :] / T) for v in (x, y))
        rx = (
            int(sx["answer_index"][0]),
            policy.reason(float(sx["confidence"][0]), float(sx["epistemic_norm"][0])),
        )
        ry = (
            int(sy["answer_index"][0]),
            policy.reason(float(sy["confidence"][0]), float(sy["epistemic_norm"][0])),
        )
        same += rx == ry
        dp = max(dp, float(np.abs(sx["probabilities"][0] - sy["probabilities"][0]).max()))
        mi32.append(float(sx["epistemic"][0]))
        mi16.append(float(sy["epistemic"][0]))
    out.update(
        {
            "s10_seconds": {k: v["d"]["seconds"] for k, v in res.items()},
            "deterministic_seconds": {k: v["m"]["seconds"] for k, v in res.items()},
            "s10_throughput_ratio": res["float32"]["d"]["seconds"] / res["bfloat16"]["d"]["seconds"],
            "deterministic_throughput_ratio": res["float32"]["m"]["seconds"]
            / res["bfloat16"]["m"]["seconds"],
            "decisions_equal": same / len(items),
            "max_abs_dp": dp,
            "mi_spearman": float(spearmanr(mi32, mi16).statistic),
            "mean_mi": {"float32": float(np.mean(mi32)), "bfloat16": float(np.mean(mi16))},
        }
    )
    return out


def top_adapter(work: Path, src: Path | None) -> str | None:
    """Copy a top-L adapter (--top-adapter) into the section's adapters directory as `top`; its name or None."""
    if src is None:
        return None
    dst = adapters_root(work) / "top"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return "top"


def top_records(src: Path) -> dict:
    """The accuracy beside the speed: the top-L and the default adapter's records of their validation metrics
    (`dalorra recalibrate --validation` writes them; the first 200 ARC-Easy validation items at S = 10 for both)."""
    out: dict = {"source": str(src)}
    for key, d in (("top", src), ("full", DEFAULT)):
        rec = json.loads((Path(d) / "dalorra.json").read_text())
        cfg = rec.get("training", {}).get("config", {})
        out[key] = {
            "top_layers": cfg.get("top_layers"),
            "validation": rec.get("validation"),
            "temperature": rec.get("temperature"),
        }
    return out


def sec_adaptive(work: Path, a) -> dict:
    """Adaptive sampling's decisions against S = 10 on every ARC-Easy validation item (the serving section sees 32):
    the default adapter's 10 draws scored once in bf16 (the HF backend as the server runs it), then the server's
    rounds (adaptive_first, adaptive_step) replayed on prefixes of those draws with its stopping rule. The server
    draws round r as bank members first..first+size−1, so a prefix is exactly what it would have scored (up to
    bf16 differences between batch layouts)."""
    from adapters.decision import AbstentionPolicy, adaptive_rounds
    from adapters.uncertainty import sampling_settled, summarize
    from server.backend import ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    items = load_jsonl("arc_easy/validation", limit=a.dtype_items)
    rec = json.loads((DEFAULT / "dalorra.json").read_text())
    policy = AbstentionPolicy.from_record(rec.get("decision"))
    T = float(rec.get("temperature", 1.0))
    st = Settings(dtype="bfloat16", threads=a.threads)
    be = HFBackend(st)
    be.load_adapter("d", str(adapters_root(work) / "a00"))
    logits = []
    for i in range(0, len(items), 16):
        reqs = [ScoreRequest("d", it.question, it.choices, None, 10, 0) for it in items[i : i + 16]]
        logits += [x.logits for x in be.score(reqs)]
        print(f"adaptive: {i + 16}/{len(items)}", flush=True)

    def outcome(lg: np.ndarray) -> tuple[int, str | None]:
        s = summarize(lg[:, None, :] / T)
        conf, epi, ent = (float(s[k][0]) for k in ("confidence", "epistemic_norm", "entropy_norm"))
        return int(s["answer_index"][0]), policy.decide(conf, epi, policy.unfamiliarity(epi, ent))

    same_answer = same_decision = 0
    used = []
    for lg in logits:
        n = 0
        for size in adaptive_rounds(10, st.adaptive_first, st.adaptive_step):
            n += size
            if sampling_settled(
                lg[:n] / T, policy.min_confidence, policy.max_epistemic, st.adaptive_tolerance, st.adaptive_z
            ):
                break
        full, ada = outcome(lg), outcome(lg[:n])
        same_answer += full[0] == ada[0]
        same_decision += full == ada
        used.append(n)
    return {
        "items": len(items),
        "dtype": "bfloat16",
        "rounds": {"first": st.adaptive_first, "step": st.adaptive_step},
        "answer_agreement": same_answer / len(items),
        "decision_agreement": same_decision / len(items),
        "mean_samples_used": float(np.mean(used)),
    }


def sec_serving(work: Path, a) -> dict:
    items = load_jsonl("arc_easy/validation", limit=64)
    n = a.requests
    out: dict = {"concurrency": 8, "requests": n}
    top = top_adapter(work, a.top_adapter)
    bf = server(work, "bfloat16", DALORRA_PRELOAD=json.dumps(["mean"] + ([top] if top else [])))
    try:
        asyncio.run(level(bf.url, items, "a00", 4, 2, 4))
        runs = {
            "bf16_deterministic": asyncio.run(level(bf.url, items, "mean", 1, 8, n)),
            "bf16_s10": asyncio.run(level(bf.url, items, "a00", 10, 8, n)),
            "bf16_adaptive": asyncio.run(level(bf.url, items, "a00", 10, 8, n, adaptive=True)),
        }
        if top:
            asyncio.run(level(bf.url, items, top, 4, 2, 4))
            runs["bf16_topL_s10"] = asyncio.run(level(bf.url, items, top, 10, 8, n))
            runs["bf16_topL_adaptive"] = asyncio.run(level(bf.url, items, top, 10, 8, n, adaptive=True))
    finally:
        bf.stop()
    if top:
        out["top_adapter"] = top_records(Path(a.top_adapter))
    fp = server(work, "float32", DALORRA_PRELOAD=json.dumps(["mean"]))
    try:
        asyncio.run(level(fp.url, items, "a00", 4, 2, 4))
        runs["fp32_deterministic"] = asyncio.run(level(fp.url, items, "mean", 1, 8, n))
        runs["fp32_s10"] = asyncio.run(level(fp.url, items, "a00", 10, 8, n))
    finally:
        fp.stop()
    full, ada = runs["bf16_s10"]["_answers"], runs["bf16_adaptive"]["_answers"]
    common = [i for i in ada if i in full]
    out["adaptive_agreement"] = sum(ada[i][:2] == full[i][:2] for i in common) / max(1, len(common))
    naive_s, naive_p = naive_loop(items[: a.naive_questions], 10, "cloze")
    out["naive"] = {
        "questions": a.naive_questions,
        "seconds": naive_s,
        "throughput_qps": a.naive_questions / naive_s,
    }
    fp_full = runs["fp32_s10"]["_answers"]
    out["naive"]["max_abs_prob_diff_vs_fp32_server"] = max(
        float(np.abs(np.array(fp_full[i][2]) - naive_p[i]).max())
        for i in range(a.naive_questions)
        if i in fp_full
    )
    for r in runs.values():
        r.pop("_answers", None)
    q = {k: v["throughput_qps"] for k, v in runs.items()}
    out["runs"] = runs
    out["ratios"] = {
        "bf16_s10_vs_deterministic_cost": q["bf16_deterministic"] / q["bf16_s10"],
        "bf16_adaptive_vs_deterministic_cost": q["bf16_deterministic"] / q["bf16_adaptive"],
        "fp32_s10_vs_deterministic_cost": q["fp32_deterministic"] / q["fp32_s10"],
        "fp32_s10_vs_naive_throughput": q["fp32_s10"] / out["naive"]["throughput_qps"],
        "headline_bf16_adaptive_vs_fp32_deterministic_cost": q["fp32_deterministic"] / q["bf16_adaptive"],
    }
    if "bf16_topL_adaptive" in q:
        out["ratios"] |= {
            "bf16_topL_s10_vs_deterministic_cost": q["bf16_deterministic"] / q["bf16_topL_s10"],
            "headline_topL_bf16_adaptive_vs_fp32_deterministic_cost": q["fp32_deterministic"]
            / q["bf16_topL_adaptive"],
        }
    return out


def _top_line(t: dict) -> str:
    def acc(x: dict) -> str:
        v = x.get("validation") or {}
        return f"acc {v.get('acc', float('nan')):.3f}, ECE {v.get('ece', float('nan')):.3f} (n {v.get('n')})"

    return (
        f"Top-L rows: {t['source']} (masks and factors in the top {t['top']['top_layers']} decoder layers only, "
        "so the layers below run once per question); accuracy beside it, from each adapter's record of the first "
        f"ARC-Easy validation items at S = 10: top-L {acc(t['top'])}; full-depth default {acc(t['full'])}."
    )


SECTIONS = {
    "memory": sec_memory,
    "throughput": sec_throughput,
    "latency": sec_latency,
    "dtype": sec_dtype,
    "serving": sec_serving,
    "adaptive": sec_adaptive,
}


def target(value: float | None, goal: str) -> dict:
    op, bound = goal.split(" ", 1)
    b = float(bound)
    met = value is not None and (value <= b if op == "<=" else value < b if op == "<" else value >= b)
    return {"value": value, "goal": goal, "met": bool(met)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dalorra-multi-adapter"), help="cache of sections")
    ap.add_argument("--fresh", action="store_true", help="re-run the sections asked for even if cached")
    ap.add_argument("--dtype", default="auto", help="server dtype of the memory/throughput/latency sections")
    ap.add_argument(
        "--order", nargs="+", default=None, help="run the sections in this order (default: as listed)"
    )
    ap.add_argument("--requests", type=int, default=32, help="requests per throughput level")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--latency-requests", type=int, default=20)
    ap.add_argument("--dtype-items", type=int, default=570, help="ARC-Easy validation items (570: all)")
    ap.add_argument("--naive-questions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="few requests and items (smoke run)")
    ap.add_argument(
        "--top-adapter",
        type=Path,
        default=None,
        help="serving section: a top-L DALorRA adapter, measured as the headline's second row",
    )
    a = ap.parse_args()
    if a.quick:
        a.requests, a.repeats, a.latency_requests, a.dtype_items, a.naive_questions = 8, 1, 4, 24, 2
    a.work.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    order = a.order or list(SECTIONS)
    for name in [*order, *[n for n in SECTIONS if n not in order]]:
        cached = a.work / f"{name}.json"
        if name in a.sections and (a.fresh or not cached.is_file()):
            print(f"== {name}", flush=True)
            res = SECTIONS[name](a.work, a)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=2, default=float))
            os.replace(tmp, cached)
        if cached.is_file():
            data[name] = json.loads(cached.read_text())
    m, t, lat, d, sv, ad = (
        data.get(k, {}) for k in ("memory", "throughput", "latency", "dtype", "serving", "adaptive")
    )
    if sv.get(
        "top_adapter"
    ):  # records read now: an adapter's validation metrics may be written after its run
        sv["top_adapter"] = top_records(Path(sv["top_adapter"]["source"]))
    r = sv.get("ratios", {})
    targets = {
        "memory_16_adapters_vs_1": target(m.get("rss_ratio_16"), "<= 1.3"),
        "load_one_more_adapter_seconds": target(m.get("load_seconds_max"), "< 1"),
        "throughput_8_adapters_vs_1": target(t.get("ratio"), ">= 0.9"),
        "bf16_s10_throughput_ratio": target(d.get("s10_throughput_ratio"), ">= 1.8"),
        "bf16_decisions_equal": target(d.get("decisions_equal"), ">= 0.995"),
        "bf16_max_abs_dp": target(d.get("max_abs_dp"), "<= 0.02"),
        "latency_p99_beside_generation_vs_alone": target(lat.get("p99_ratio"), "<= 3"),
        "throughput_s10_vs_deterministic_cost": target(r.get("bf16_s10_vs_deterministic_cost"), "<= 4"),
        "throughput_adaptive_vs_deterministic_cost": target(
            r.get("bf16_adaptive_vs_deterministic_cost"), "<= 2.5"
        ),
        "throughput_adaptive_decision_agreement": target(
            ad.get("decision_agreement", sv.get("adaptive_agreement")), ">= 0.99"
        ),
        "throughput_s10_vs_naive": target(r.get("fp32_s10_vs_naive_throughput"), ">= 3"),
        "throughput_headline_bf16_adaptive_vs_fp32_deterministic": target(
            r.get("headline_bf16_adaptive_vs_fp32_deterministic_cost"), "<= 1.0"
        ),
    }
    if "headline_topL_bf16_adaptive_vs_fp32_deterministic_cost" in r:
        targets["throughput_headline_topL_bf16_adaptive_vs_fp32_deterministic"] = target(
            r["headline_topL_bf16_adaptive_vs_fp32_deterministic_cost"], "<= 1.0"
        )
    data["targets"] = targets
    lines = ["| target | value | goal | met |", "|---|---|---|---|"]
    for k, v in targets.items():
        val = "not run" if v["value"] is None else f"{v['value']:.3g}"
        lines.append(f"| {k} | {val} | {v['goal']} | {'yes' if v['met'] else 'no'} |")
    if m:
        from adapters.basemodel import resolve_dtype

        mb = {k: f"{v / 2**20:.0f} MiB" for k, v in m["rss_bytes"].items()}
        m["dtype"] = (
            f"{m['dtype']} = {resolve_dtype(m['dtype'])} here" if m["dtype"] == "auto" else m["dtype"]
        )
        lines += [
            "",
            f"Resident memory by adapters loaded ({m['dtype']}): {mb}; per extra adapter "
            f"{m['per_extra_adapter_bytes'] / 2**20:.1f} MiB; hot load median {m['load_seconds_median']:.2f} s, "
            f"max {m['load_seconds_max']:.2f} s.",
        ]
    if t:
        lines += [
            "",
            f"Concurrency 8, S = 10: all on one adapter {t['one_adapter_qps']:.2f} q/s, spread over 8 "
            f"{t['eight_adapters_qps']:.2f} q/s ({t['repeats']} alternating repeats of {t['requests']}).",
        ]
    if lat:
        lines += [
            "",
            f"/predict (S = 10) alone p50/p99 {lat['alone']['p50_s']:.2f}/{lat['alone']['p99_s']:.2f} s; "
            f"beside a {lat['prompt_words']}-word generation with 16 samples "
            f"{lat['beside']['p50_s']:.2f}/{lat['beside']['p99_s']:.2f} s.",
        ]
    if d:
        lines += [
            "",
            f"bf16 vs float32 on this CPU (AVX512-BF16/AMX: {d['cpu_has_bf16']}), {d['items']} ARC-Easy "
            f"validation items: S = 10 {d['s10_throughput_ratio']:.2f}x, deterministic "
            f"{d['deterministic_throughput_ratio']:.2f}x faster; decisions equal {d['decisions_equal']:.4f}; "
            f"max |dp| {d['max_abs_dp']:.4f}; Spearman of MI {d['mi_spearman']:.3f}.",
        ]
    if ad:
        lines += [
            "",
            f"Adaptive sampling against S = 10 on {ad['items']} ARC-Easy validation items (rounds "
            f"{ad['rounds']['first']} + {ad['rounds']['step']}…, replayed on prefixes of the same bf16 draws): "
            f"same decision {ad['decision_agreement']:.4f}, same answer {ad['answer_agreement']:.4f}, mean S "
            f"{ad['mean_samples_used']:.2f}. (The target uses this; the serving runs below compare only their 32 "
            "requests.)",
        ]
    if sv:
        lines += ["", "| run | q/s | p50 (s) | p99 (s) | mean S |", "|---|---|---|---|---|"]
        for k, v in sv["runs"].items():
            lines.append(
                f"| {k} | {v['throughput_qps']:.2f} | {v['p50_s']:.2f} | {v['p99_s']:.2f} | "
                f"{v['mean_samples_used']:.2f} |"
            )
        lines += [
            "",
            f"Naive PEFT loop (S = 10, float32): {sv['naive']['throughput_qps']:.3f} q/s. "
            f"Adaptive decisions equal to S = 10: {sv['adaptive_agreement']:.3f}. "
            + (
                _top_line(sv["top_adapter"])
                if sv.get("top_adapter")
                else "No top-L adapter was given (--top-adapter), so the headline has no top-L row."
            ),
        ]
    write("multi_adapter", data, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
