"""Each scoring optimisation measured on and off, side by side in one process (issue: Efficiency).

    python bench/optimisations.py [--questions 8] [--samples 10] [--repeats 3]
Same questions (ARC-Easy validation), same adapter (the default one unless --adapter), median of
--repeats timings per variant; the tests (tests/test_scoring.py, tests/test_server.py) check that every
"on" path gives the same numbers as its "off" path. Writes bench/results/optimisations.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adapters.data import load_jsonl  # noqa: E402
from bench.common import write  # noqa: E402
from server.settings import REPO  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    out, ts = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=str(REPO / "adapters" / "default" / "arc-easy-dalorra"))
    ap.add_argument("--top-adapter", default=None, help="a top-L adapter for the shared-lower-layers row")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    from adapters.adapter_io import load_adapter
    from adapters.basemodel import load_base
    from adapters.config import PromptFormat
    from adapters.scoring import choice_logits, encode, rows_for, score
    from server.backend import ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    items = load_jsonl("arc_easy/validation", limit=max(a.questions, 24))
    qs = items[: a.questions]
    S, R = a.samples, a.repeats
    rows: list[dict] = []

    def add(name: str, on: float, off: float, diff: float, note: str = "") -> None:
        rows.append({"optimisation": name, "on_s": on, "off_s": off, "speedup": off / on, "max_abs_diff": diff,
                     "note": note})
        print(rows[-1], flush=True)

    base, tok = load_base(None)
    model = load_adapter(a.adapter, base, tok)
    score(model, qs[:2], samples=2)  # warm-up
    with torch.no_grad():
        on, x = timed(lambda: score(model, qs, samples=S, seed=0), R)
        off, y = timed(lambda: score(model, qs, samples=S, seed=0, batched=False), R)
        add(f"one forward for all S·B rows (vs S forwards of B rows), cloze, S={S}", on, off,
            float(np.nanmax(np.abs(x - y)[np.isfinite(x)])))
        on, x = timed(lambda: score(model, qs, samples=S, seed=0), R)
        off, y = timed(lambda: score(model, qs, samples=S, seed=0, cloze_cache=False), R)
        add("cloze: prompt once + K continuations from its KV cache (vs K full sequences)", on, off,
            float(np.nanmax(np.abs(x - y)[np.isfinite(x)])))
        model.fmt = PromptFormat.from_dict({**model.fmt.to_dict(), "mode": "letter", "template": ""})
        enc = encode(qs, tok, model.fmt)
        items_r, samples_r = rows_for(len(qs), S)
        masks = model.draw_masks(S, 0)
        on, x = timed(lambda: choice_logits(model, enc, items_r, masks, samples_r), R)

        def full_head():  # the naive letter path: full logits at every position, then pick K letters
            from adapters.scoring import _left_pad, letter_token_ids

            ids, attn, pos = _left_pad([enc[i].prompt for i in items_r], tok.pad_token_id, "cpu")
            with model.row_masks(masks, samples_r):
                logits = model.base(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # (R, L, V)
            return logits[:, -1, letter_token_ids(tok, model.fmt, x.shape[1])]
        off, y = timed(full_head, R)
        add("letter: last position and only the K answer rows of lm_head (vs full logits)", on, off,
            float((x - y)[torch.isfinite(x)].abs().max()))

    # Length bucketing and the result cache, through the HF backend as the server runs it.
    mixed = [ScoreRequest("d", it.question + (" Explain." * (12 * (i % 4))), it.choices, None, S, i)
             for i, it in enumerate(items[:24])]
    res = {}
    for bucket in (True, False):
        be = HFBackend(Settings(length_bucketing=bucket))
        be.load_adapter("d", a.adapter)
        be.score(mixed[:2])
        res[bucket] = timed(lambda be=be: be.score(mixed), R)
    add(f"length bucketing (24 requests of mixed length, forwards of {Settings().max_forward_rows} rows)",
        res[True][0], res[False][0],
        max(float(np.abs(p - q).max()) for p, q in zip(res[True][1], res[False][1], strict=True)))

    threads = torch.get_num_threads()
    if threads > 1:
        with torch.no_grad():
            model.fmt = PromptFormat.from_dict({**model.fmt.to_dict(), "mode": "cloze", "template": ""})
            on, x = timed(lambda: score(model, qs, samples=S, seed=0), R)
            torch.set_num_threads(1)
            off, y = timed(lambda: score(model, qs, samples=S, seed=0), R)
            torch.set_num_threads(threads)
        add(f"torch threads {threads} (vs 1)", on, off, float(np.nanmax(np.abs(x - y)[np.isfinite(x)])))

    if a.top_adapter:
        tb, tt = load_base(None)
        top = load_adapter(a.top_adapter, tb, tt)
        enc = encode(qs, tt, top.fmt)
        items_r, samples_r = rows_for(len(qs), S)
        masks = top.draw_masks(S, 0)
        with torch.no_grad():
            on, x = timed(lambda: choice_logits(top, enc, items_r, masks, samples_r), R)
            off, y = timed(lambda: choice_logits(top, enc, items_r, masks, samples_r, shared_lower=False), R)
        lo = top.first_adapted_layer()
        add(f"top-L adapter: layers < {lo} once per question (vs per row)", on, off,
            float((x - y)[torch.isfinite(x)].abs().max()))

    table = [f"{a.questions} ARC-Easy validation questions, S = {S}, median of {R}; adapter `{a.adapter}`.", "",
             "| optimisation | on (s) | off (s) | speed-up | max abs diff |", "|---|---|---|---|---|"]
    table += [f"| {r['optimisation']} | {r['on_s']:.2f} | {r['off_s']:.2f} | {r['speedup']:.2f}× | "
              f"{r['max_abs_diff']:.1e} |" for r in rows]
    table += ["", "Result cache: a hit skips the backend entirely (tests/test_server.py checks the backend call "
              "count does not move); its speed-up is the whole request cost. Not built: torch.compile at start-up."]
    write("optimisations", {"rows": rows, "questions": a.questions, "samples": S, "repeats": R,
                            "adapter": a.adapter, "top_adapter": a.top_adapter}, "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
