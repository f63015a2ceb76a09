"""Generated answers on the embedded model: cost of the uncertainty pass, and whether it predicts wrong answers.

    python -m bench.generate [--adapter arc-easy-dalorra] [--questions 100] [--calibration 40]
        [--max-tokens 16] [--latency-repeats 6] [--samples 10] [--target-error 0.3]

Runs the HF backend in this process (the server's own generate path, without HTTP):
  1. speed: 32-token answers (ignore_eos, greedy) without the uncertainty pass (samples=0) and with it at S=10,
     interleaved; p50 latency and tokens/s (32 / latency), plus the decode / score split.
  2. short answers: ARC-Easy *test* questions whose gold choice is a phrase of at most 3 words and that do not
     need the choices ("which of the following" and similar are skipped); the adapter's own cloze prompt
     "Question: …\\nAnswer:", greedy, stop at a newline. Correct = normalised exact match (lower case, no
     punctuation or articles). The set, the request and the match are adapters/short_answers.py's, which
     `dalorra train` and `dalorra eval --generation-set` use to fit the thresholds the server applies. AUROC for predicting a *wrong* answer from each score, on the questions after
     the first --calibration ones; the generation thresholds are fitted on those first ones and written to
     bench/results/generate_decision.json (load it with DALORRA_GENERATION_DECISION).
Writes bench/results/generate.json and generate.md. On a busy machine run the two parts in parallel:
    python -m bench.generate --speed-out /tmp/speed.json  &  python -m bench.generate --skip-speed
then python -m bench.generate --speed-in /tmp/speed.json (resumes every answer from --partial, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from adapters.calibration import auroc
from adapters.config import PromptFormat
from adapters.data import load_jsonl
from adapters.generation import (
    GenerateRequest,
    decide,
    fit_generation_decision,
    summarize_answer,
    thresholds_of,
)
from adapters.short_answers import exact_match, normalise, short_answer_items, short_answer_request
from bench.common import RESULTS, write

SPEED_PROMPTS = [
    "Question: Why do leaves change color in the fall?\nAnswer:",
    "Question: How does the Moon affect the tides on Earth?\nAnswer:",
    "Question: What happens to water when it freezes?\nAnswer:",
]
SCORES = {  # name → (function of the summary, what it means); higher = more likely wrong
    "epistemic_mean": (lambda s: s["epistemic_mean"], "mean per-token MI"),
    "epistemic_max": (lambda s: s["epistemic_max"], "max per-token MI"),
    "entropy_mean": (lambda s: s["entropy_mean"], "mean per-token predictive entropy"),
    "entropy_max": (lambda s: s["entropy_max"], "max per-token predictive entropy"),
    "1-confidence": (lambda s: 1 - s["confidence"], "1 − geometric-mean token probability (p̄)"),
    "loglik_std": (lambda s: s["loglik_std"], "spread of the answer's log-likelihood across masks"),
    "-loglik_mean": (lambda s: -s["loglik_mean"], "negative answer log-likelihood (mean over masks)"),
    "tokens": (lambda s: s["tokens"], "answer length in tokens (a baseline: no model uncertainty at all)"),
}


def speed(be, adapter: str, samples: int, repeats: int, tokens: int = 32) -> dict:
    runs = {0: [], samples: []}
    for r in range(repeats):
        for s in (0, samples) if r % 2 == 0 else (samples, 0):  # interleaved: drift hits both alike
            req = GenerateRequest(
                adapter=adapter,
                prompt=SPEED_PROMPTS[r % len(SPEED_PROMPTS)],
                max_tokens=tokens,
                temperature=0.0,
                samples=s,
                ignore_eos=True,
            )
            t0, c0 = time.perf_counter(), time.process_time()
            res = be.generate(req)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert len(res.choices[0].token_ids) == tokens, "ignore_eos must give exactly `tokens` tokens"
            runs[s].append(
                {
                    "seconds": dt,
                    "cpu_seconds": cpu,
                    "decode_s": res.decode_seconds,
                    "score_s": res.score_seconds,
                    "load_avg_1m": os.getloadavg()[0],
                }
            )
            print(f"speed S={s} run {r}: {dt:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    out = {}
    for s, rs in runs.items():
        sec = np.array([x["seconds"] for x in rs])
        cpu = np.array([x["cpu_seconds"] for x in rs])
        out[f"S={s}"] = {
            "p50_latency_s": float(np.median(sec)),
            "tokens_per_s": float(tokens / np.median(sec)),
            "p50_cpu_s": float(np.median(cpu)),
            "tokens_per_cpu_s": float(tokens / np.median(cpu)),
            "decode_s_p50": float(np.median([x["decode_s"] for x in rs])),
            "score_s_p50": float(np.median([x["score_s"] for x in rs])),
            "runs": rs,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--adapters-dir", default=str(Path(__file__).resolve().parents[1] / "adapters" / "default")
    )
    ap.add_argument("--adapter", default="arc-easy-dalorra")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--calibration", type=int, default=40, help="first N questions fit the thresholds")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--latency-repeats", type=int, default=6)
    ap.add_argument(
        "--target-error", type=float, default=0.3, help="selective-error target of the thresholds"
    )
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-out", default=None, help="run only the speed part and write its JSON here")
    ap.add_argument(
        "--speed-in", default=None, help="take the speed part from a --speed-out file (run in parallel)"
    )
    ap.add_argument("--partial", default="/tmp/dalorra_generate_rows.jsonl", help="answers so far (resume)")
    a = ap.parse_args()

    from server.hf_backend import HFBackend
    from server.settings import Settings

    partial = Path(a.partial)
    rows = [json.loads(x) for x in partial.read_text().splitlines()] if partial.is_file() else []
    rows = rows[: a.questions]
    todo = a.speed_out or len(rows) < a.questions or not (a.speed_in or a.skip_speed)
    if todo:  # a pure report (every answer resumed, speed from a file) needs no model
        be = HFBackend(Settings())
        rec = be.load_adapter(a.adapter, str(Path(a.adapters_dir) / a.adapter))
        fmt = PromptFormat.from_dict(rec.get("prompt") or {})
    if a.speed_out:
        Path(a.speed_out).write_text(json.dumps(speed(be, a.adapter, a.samples, a.latency_repeats)))
        return
    for k, it in enumerate(short_answer_items(load_jsonl("arc_easy/test"), a.questions)):
        qid, q, gold = it.id, it.question, it.choices[it.label]
        if k < len(rows):  # resumed: already answered in an earlier (interrupted) run
            assert rows[k]["id"] == qid, "the partial file belongs to other settings; delete it"
            continue
        res = be.generate(short_answer_request(it, fmt, a.adapter, a.samples, a.max_tokens))
        c = res.choices[0]
        s = summarize_answer(c.scores)
        rows.append(
            {
                "id": qid,
                "question": q,
                "gold": gold,
                "answer": c.text,
                "finish_reason": c.finish_reason,
                "correct": exact_match(c.text, gold),
                "contains_gold": f" {normalise(gold)} " in f" {normalise(c.text)} ",
                "decode_s": res.decode_seconds,
                "score_s": res.score_seconds,
                **s,
            }
        )
        with partial.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(
            f"{k:3d} {'✓' if rows[-1]['correct'] else '✗'} {c.text.strip()[:40]!r} gold={gold!r} "
            f"epi={s['epistemic_mean']:.2e} H={s['entropy_mean']:.2f}",
            flush=True,
        )

    if a.speed_in:
        sp = json.loads(Path(a.speed_in).read_text())
    else:
        sp = {} if a.skip_speed else speed(be, a.adapter, a.samples, a.latency_repeats)
    report(rows, sp, a)


def report(rows: list[dict], sp: dict, a) -> None:
    cal, test = rows[: a.calibration], rows[a.calibration :]
    correct = np.array([r["correct"] for r in rows], dtype=float)
    c_cal, c_test = correct[: a.calibration], correct[a.calibration :]
    decision = fit_generation_decision(
        np.array([r["confidence"] for r in cal]),
        np.array([r["epistemic_mean"] for r in cal]),
        c_cal,
        a.target_error,
    )
    decision.update(
        {
            "fitted_on": f"bench/generate.py: first {len(cal)} short-answer ARC-Easy test questions",
            "samples": a.samples,
            "max_tokens": a.max_tokens,
        }
    )
    conf_t, epi_t = thresholds_of(decision)
    answered = [decide(r, conf_t, epi_t) is None for r in test]
    dec_eval = {
        "coverage": float(np.mean(answered)) if test else None,
        "selective_error": float(
            1 - np.mean([r["correct"] for r, ok in zip(test, answered, strict=True) if ok])
        )
        if any(answered)
        else None,
    }

    def _auroc(fn, rs, wrong):
        return auroc(np.array([fn(r) for r in rs]), wrong) if 0 < wrong.sum() < len(rs) else None

    contains = np.array([r["contains_gold"] for r in rows], dtype=float)

    def _ci(fn, rs, wrong, reps=2000):  # percentile bootstrap over questions, fixed seed
        rng = np.random.default_rng(0)
        x = np.array([fn(r) for r in rs])
        got = []
        for _ in range(reps):
            i = rng.integers(0, len(rs), len(rs))
            if 0 < wrong[i].sum() < len(i):
                got.append(auroc(x[i], wrong[i]))
        return [float(np.percentile(got, 2.5)), float(np.percentile(got, 97.5))] if got else None

    aurocs = {
        name: {
            "test": _auroc(fn, test, 1 - c_test),
            "all": _auroc(fn, rows, 1 - correct),
            "all_ci95": _ci(fn, rows, 1 - correct),
            "all_contains": _auroc(fn, rows, 1 - contains),
        }
        for name, (fn, _) in SCORES.items()
    }
    (RESULTS / "generate_decision.json").write_text(json.dumps({a.adapter: decision}, indent=2))

    data = {
        "adapter": a.adapter,
        "samples": a.samples,
        "max_tokens": a.max_tokens,
        "seeds": {"mask_seed": 0, "decoding": "greedy (temperature 0)"},
        "questions": len(rows),
        "calibration": len(cal),
        "test": len(test),
        "accuracy_all": float(correct.mean()),
        "contains_gold_all": float(contains.mean()),
        "accuracy_test": float(c_test.mean()) if test else None,
        "speed": sp,
        "auroc_wrong": aurocs,
        "decision": decision,
        "decision_on_test": dec_eval,
        "items": rows,
    }
    md = []
    if sp:
        md += [
            "## Speed (32-token answers, greedy, one request at a time)",
            "",
            "| uncertainty pass | p50 latency (s) | tokens/s (wall) | p50 CPU time (s) | tokens per CPU-second | "
            "decode p50 (s) | score p50 (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in sp.items():
            md.append(
                f"| {'none' if k == 'S=0' else k} | {v['p50_latency_s']:.2f} | {v['tokens_per_s']:.2f} | "
                f"{v['p50_cpu_s']:.2f} | {v['tokens_per_cpu_s']:.2f} | {v['decode_s_p50']:.2f} | "
                f"{v['score_s_p50']:.2f} |"
            )
        loads = [r["load_avg_1m"] for v in sp.values() for r in v["runs"]]
        md += [
            "",
            f"Load average during these runs: {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores "
            "(other jobs running); wall-clock numbers carry that contention, CPU time much less so.",
            "",
        ]
    md += [
        f"## Does the score predict a wrong generated answer? ({len(rows)} ARC-Easy test questions with a short "
        f"gold answer, max_tokens {a.max_tokens}, S = {a.samples})",
        "",
        f"Accuracy (normalised exact match): {correct.mean():.3f} overall, "
        f"{c_test.mean() if test else float('nan'):.3f} on the {len(test)} evaluation questions.",
        "",
        f"Answers containing the normalised gold phrase: {contains.mean():.3f} (a lenient secondary criterion).",
        "",
        "| score (higher = more likely wrong) | meaning | AUROC, evaluation part | AUROC, all [95% bootstrap CI] | "
        "AUROC, all, wrong = gold not contained |",
        "|---|---|---|---|---|",
    ]

    def f3(x):
        return "n/a" if x is None else f"{x:.3f}"

    for name, (_, meaning) in SCORES.items():
        v = aurocs[name]
        ci = v["all_ci95"]
        ci_s = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        md.append(
            f"| {name} | {meaning} | {f3(v['test'])} | {f3(v['all'])}{ci_s} | {f3(v['all_contains'])} |"
        )
    md += [
        "",
        f"Thresholds fitted on the first {len(cal)} questions (target selective error {a.target_error}, "
        f"δ = 0.1): confidence {json.dumps(decision['confidence'].get('threshold'))} "
        f"(valid: {decision['confidence']['valid']}), epistemic {json.dumps(decision['epistemic'].get('threshold'))} "
        f"(valid: {decision['epistemic']['valid']}); on the evaluation part: coverage {dec_eval['coverage']}, "
        f"selective error {dec_eval['selective_error']}. Written to bench/results/generate_decision.json.",
    ]
    md += [
        "",
        "Reproduce (the speed part and the answers ran in parallel here; the last command only reports): "
        f"`python -m bench.generate --speed-out /tmp/speed.json --latency-repeats {a.latency_repeats}`, "
        f"`python -m bench.generate --skip-speed --questions {len(rows)} --calibration {len(cal)}`, then "
        f"`python -m bench.generate --questions {len(rows)} --calibration {len(cal)} --speed-in /tmp/speed.json` "
        "(all with OMP_NUM_THREADS=1 here). Decoding is greedy; the S = 10 masks are the adapter's fixed draws "
        "(mask seed 0). Per-item answers and scores are in generate.json.",
    ]
    write("generate", data, "\n".join(md))


if __name__ == "__main__":
    main()
