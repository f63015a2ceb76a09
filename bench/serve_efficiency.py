"""Serving efficiency (issue: Efficiency): a real server process under bounded load, against two references.

    python -m bench.serve_efficiency [--samples 1 4 10 32] [--concurrency 1 8 32] [--modes cloze letter] [--quick]

In one run, on the same questions (ARC-Easy validation) and machine:
  * server grid: S × concurrency, closed-loop asyncio + httpx clients on loopback, a fixed number of
    requests per level (max(8, 2 × concurrency) unless --requests), in the default adapter's scoring mode
    (cloze) and in letter mode (the same weights scored by answer letter: a cost measurement only);
  * reference (a), the naive loop a user writes today: the PEFT model, S sequential forwards per question
    with each mask written into lora_A, K full sequences per mask in cloze mode, full-vocabulary logits,
    one question at a time; its probabilities are checked against the server's for the same draws;
  * reference (b), one deterministic LoRA answer: the adapter with its mean mask folded into A
    (E[z] = σ(φ)), S = 1, served by the same server;
  * adaptive sampling (S ≤ 10) through the server;
  * a profile of one S = 10 backend batch (torch.profiler, top operators by self CPU time).
Writes bench/results/serve_efficiency.{json,md}; ratios are side by side from this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from adapters.data import load_jsonl
from bench.common import RESULTS, write
from bench.loopback import ServerProcess

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "adapters" / "default" / "arc-easy-dalorra"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def level(
    url: str, items, adapter: str | list[str], samples: int, concurrency: int, n: int, **extra
) -> dict:
    """n requests from `concurrency` closed-loop clients; a list of adapters is used round-robin (request i → i mod)."""
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    lat: list[float] = []
    used: list[int] = []
    answers: dict[int, tuple] = {}
    errors = 0
    todo = list(range(n))[::-1]

    async def worker(c: httpx.AsyncClient):
        nonlocal errors
        while todo:
            i = todo.pop()
            it = items[i % len(items)]
            t = time.perf_counter()
            r = await c.post(
                url + "/predict",
                json={
                    "question": it.question,
                    "choices": list(it.choices),
                    "samples": samples,
                    "adapter": names[i % len(names)],
                    **extra,
                },
            )
            if r.status_code == 200:
                lat.append(time.perf_counter() - t)
                b = r.json()
                used.append(b["samples"])
                answers[i % len(items)] = (b["answer_index"], b["decision"], b["probabilities"])
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=1200) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {
        "adapter": adapter,
        "samples": samples,
        "concurrency": concurrency,
        "requests": n,
        "errors": errors,
        "throughput_qps": len(lat) / wall,
        "p50_s": pct(lat, 0.5),
        "p95_s": pct(lat, 0.95),
        "p99_s": pct(lat, 0.99),
        "mean_s": statistics.mean(lat) if lat else None,
        "wall_s": wall,
        "mean_samples_used": statistics.mean(used) if used else None,
        **extra,
        "_answers": answers,
    }


def make_variants(root: Path, top: str | None) -> None:
    """letter-mode copy, and the deterministic mean-mask adapter, beside the default adapter."""
    import torch

    from adapters.maskbank import BankSource

    shutil.copytree(DEFAULT, root / "default")
    letter = root / "letter"
    shutil.copytree(DEFAULT, letter)
    rec = json.loads((letter / "dalorra.json").read_text())
    rec["prompt"].update(mode="letter", template="")  # the letter mode's default template
    rec.pop("decision", None)
    (letter / "dalorra.json").write_text(json.dumps(rec))
    src = BankSource(DEFAULT)
    mean = {n: src.keep[n][None].float() for n in src.ranks}  # (1, r): E[z] folded into A
    out = src.write_member({n: m.to(torch.float32) for n, m in mean.items()}, 0, root / "mean")
    rec = json.loads((DEFAULT / "dalorra.json").read_text())
    rec["adapter"] = {**rec["adapter"], "stochastic": False, "method": "lora"}
    rec["method"] = "lora"
    rec.pop("decision", None)
    (out / "dalorra.json").write_text(json.dumps(rec))
    if top:
        shutil.copytree(top, root / "top")


def naive_loop(items, samples: int, mode: str) -> tuple[float, list[np.ndarray]]:
    """Reference (a): PEFT model, S sequential masked forwards per question, full logits, no batching."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.basemodel import local_path
    from adapters.config import PromptFormat
    from adapters.maskbank import BankSource, draw_masks_from
    from adapters.scoring import encode, letter_token_ids

    src = BankSource(DEFAULT)
    fmt = PromptFormat.from_dict(
        {**src.record["prompt"], "mode": mode, **({"template": ""} if mode == "letter" else {})}
    )
    base = AutoModelForCausalLM.from_pretrained(local_path(None), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(local_path(None))
    model = PeftModel.from_pretrained(base, str(DEFAULT)).eval()
    lora = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }
    A0 = {n: m.lora_A["default"].weight.detach().clone() for n, m in lora.items()}
    letters = letter_token_ids(tok, fmt, len(fmt.letters)) if mode == "letter" else None
    probs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for it in items:
            e = encode([it], tok, fmt)[0]
            per = []
            for s in range(samples):
                z = draw_masks_from(src.ranks, src.keep, src.fixed, 1, seed=0, first=s)
                for n, m in lora.items():
                    m.lora_A["default"].weight.copy_(A0[n] * z[n][0][:, None])
                if mode == "letter":
                    logits = model(input_ids=torch.tensor([e.prompt])).logits[0, -1]
                    per.append(logits[letters[: e.k]].double().numpy())
                else:
                    row = []
                    for k, cont in enumerate(e.conts):
                        ids = torch.tensor([list(e.prompt) + list(cont)])
                        lp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
                        L = len(cont)
                        tgt = ids[0, -L:]
                        row.append(float(lp[-L - 1 : -1].gather(1, tgt[:, None]).sum()) / e.norms[k])
                    per.append(np.array(row))
            p = np.exp(np.array(per) - np.max(per, -1, keepdims=True))
            probs.append((p / p.sum(-1, keepdims=True)).mean(0))
    for n, m in lora.items():
        m.lora_A["default"].weight.copy_(A0[n])
    return time.perf_counter() - t0, probs


def profile_batch(items, samples: int) -> list[dict]:
    """Top operators by self CPU time for one backend-sized batch (8 questions × S) of the core scorer."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from adapters.adapter_io import load_adapter
    from adapters.basemodel import load_base
    from adapters.scoring import score

    base, tok = load_base(None)
    model = load_adapter(DEFAULT, base, tok)
    score(model, items[:2], samples=2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        score(model, items[:8], samples=samples)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return [
        {
            "op": e.key,
            "self_cpu_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4, 10, 32])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["cloze", "letter"])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2·c))")
    ap.add_argument("--naive-questions", type=int, default=8)
    ap.add_argument(
        "--top-adapter", default=None, help="a top-L DALorRA adapter to measure beside the default"
    )
    ap.add_argument("--quick", action="store_true", help="S 10, concurrency 8, cloze only (smoke run)")
    a = ap.parse_args()
    if a.quick:
        a.samples, a.concurrency, a.modes = [10], [8], ["cloze"]
    items = load_jsonl("arc_easy/validation", limit=64)
    root = Path(tempfile.mkdtemp(prefix="dalorra-bench-"))
    make_variants(root, a.top_adapter)
    runs: list[dict] = []
    preload = ["letter", "mean"] + (["top"] if a.top_adapter else [])
    # The result cache is off: questions repeat across levels, and this measures scoring, not cache hits.
    srv = ServerProcess(
        root,
        "default",
        root / "server.log",
        DALORRA_PRELOAD=json.dumps(preload),
        DALORRA_RESULT_CACHE_SIZE="0",
        DALORRA_REQUEST_TIMEOUT_S="900",
    ).wait_ready()
    try:
        asyncio.run(level(srv.url, items, "default", 4, 2, 4))  # warm-up
        for mode in a.modes:
            adapter = "default" if mode == "cloze" else "letter"
            for S in a.samples:
                for c in a.concurrency:
                    n = a.requests or max(8, 2 * c)
                    r = asyncio.run(level(srv.url, items, adapter, S, c, n))
                    r["mode"] = mode
                    runs.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "_answers"}), flush=True)
        c8 = 8 if 8 in a.concurrency else a.concurrency[-1]
        n = a.requests or max(8, 2 * c8)
        det = asyncio.run(level(srv.url, items, "mean", 1, c8, n))
        det["mode"], det["reference"] = "cloze", "deterministic (S=1, mean mask)"
        ada = asyncio.run(level(srv.url, items, "default", 10, c8, n, adaptive=True))
        ada["mode"] = "cloze"
        full = next(
            (r for r in runs if r["mode"] == "cloze" and r["samples"] == 10 and r["concurrency"] == c8), None
        )
        if full is None:
            full = asyncio.run(level(srv.url, items, "default", 10, c8, n))
            full["mode"] = "cloze"
            runs.append(full)
        runs += [det, ada]
        top = top_ada = None
        if a.top_adapter:
            top = asyncio.run(level(srv.url, items, "top", 10, c8, n))
            top_ada = asyncio.run(level(srv.url, items, "top", 10, c8, n, adaptive=True))
            top["mode"] = top_ada["mode"] = "cloze"
            top["reference"], top_ada["reference"] = "top-L, S=10", "top-L, adaptive ≤ 10"
            runs += [top, top_ada]
        print(json.dumps({k: v for k, v in ada.items() if k != "_answers"}), flush=True)
    finally:
        srv.stop()
    naive_s, naive_p = naive_loop(items[: a.naive_questions], 10, "cloze")
    naive = {
        "reference": "naive loop (PEFT, S sequential forwards, K full sequences, full logits)",
        "mode": "cloze",
        "samples": 10,
        "questions": a.naive_questions,
        "seconds": naive_s,
        "throughput_qps": a.naive_questions / naive_s,
    }
    served = full["_answers"]
    naive["max_abs_prob_diff_vs_server"] = max(
        float(np.abs(np.array(served[i][2]) - naive_p[i]).max())
        for i in range(a.naive_questions)
        if i in served
    )
    same = [i for i in ada["_answers"] if i in full["_answers"]]
    agree = sum(ada["_answers"][i][:2] == full["_answers"][i][:2] for i in same) / max(1, len(same))
    prof = profile_batch(items, 10)
    ratios = {
        "s10_vs_naive_throughput": full["throughput_qps"] / naive["throughput_qps"],
        "s10_vs_deterministic_cost": det["throughput_qps"] / full["throughput_qps"],
        "adaptive_vs_deterministic_cost": det["throughput_qps"] / ada["throughput_qps"],
    }
    if top is not None:
        ratios["topL_s10_vs_deterministic_cost"] = det["throughput_qps"] / top["throughput_qps"]
        ratios["topL_adaptive_vs_deterministic_cost"] = det["throughput_qps"] / top_ada["throughput_qps"]
    offline = RESULTS / "adaptive.json"
    adaptive_agreement = {"this_run": {"questions": len(same), "agreement": agree}}
    if offline.is_file():
        o = json.loads(offline.read_text())
        adaptive_agreement["arc_easy_validation"] = {
            "questions": o["items"],
            "agreement": o["decision_agreement"],
            "mean_samples": o["mean_samples"],
            "source": "adaptive.json",
        }
    for r in runs:
        r.pop("_answers", None)
    data = {
        "top_adapter": a.top_adapter,
        "runs": runs,
        "naive": naive,
        "ratios": ratios,
        "adaptive_decision_agreement": adaptive_agreement,
        "profile_top_ops": prof,
        "concurrency_for_ratios": c8,
    }
    table = [
        "| mode | S | concurrency | requests | q/s | p50 (s) | p95 (s) | p99 (s) | mean S used | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        name = r.get("reference") or ("adaptive ≤ 10" if r.get("adaptive") else str(r["samples"]))
        table.append(
            f"| {r['mode']} | {name} | {r['concurrency']} | {r['requests']} | {r['throughput_qps']:.2f} | "
            f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | {r['mean_samples_used']:.2f} | "
            f"{r['errors']} |"
        )
    table += [
        "",
        f"Naive loop (cloze, S = 10, {a.naive_questions} questions, one at a time): "
        f"{naive['throughput_qps']:.3f} q/s; max |p_naive − p_server| = "
        f"{naive['max_abs_prob_diff_vs_server']:.1e} (same draws).",
        "",
        f"| ratio (concurrency {c8}) | value |",
        "|---|---|",
    ]
    table += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    table += [
        "",
        f"Adaptive decisions equal to full S = 10: {json.dumps(adaptive_agreement)}",
        "",
        "Profile of one batch (8 questions × S = 10, cloze), top operators by self CPU time:",
        "",
        "| op | self CPU (s) | share | calls |",
        "|---|---|---|---|",
    ]
    table += [f"| {p['op']} | {p['self_cpu_s']:.2f} | {p['share']:.0%} | {p['calls']} |" for p in prof]
    write("serve_efficiency", data, "\n".join(table))
    print("\n".join(table))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
