"""Each scoring optimisation measured on and off, side by side in one process (issue: Efficiency).

    python -m bench.optimisations [--questions 8] [--samples 10] [--repeats 3] [--only compile ...]
Same questions (ARC-Easy validation), same adapter (the default one unless --adapter), median of
--repeats timings per variant; the tests (tests/test_scoring.py, tests/test_server.py) check that every
"on" path gives the same numbers as its "off" path. Writes bench/results/optimisations.{json,md}; with --only,
the named sections are measured again and replace their old rows (the other rows are kept, each with its date).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from adapters.data import load_jsonl
from bench.common import RESULTS, command, write
from server.settings import REPO

SECTIONS = ["scoring", "bucketing", "threads", "top_l", "compile"]


def timed(fn, repeats: int) -> tuple[float, object]:
    out, ts = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def _diff(x, y) -> float:
    x, y = np.asarray(x), np.asarray(y)
    fin = np.isfinite(x)
    return float(np.abs(x - y)[fin].max())


def _backend_diff(xs, ys) -> float:
    return max(float(np.abs(p.logits - q.logits).max()) for p, q in zip(xs, ys, strict=True))


class Bench:
    def __init__(self, a):
        self.a, self.S, self.R = a, a.samples, a.repeats
        self.items = load_jsonl("arc_easy/validation", limit=max(a.questions, 24))
        self.qs = self.items[: a.questions]
        self.rows: list[dict] = []
        self.section = ""

    def add(self, name: str, on: float, off: float, diff: float, note: str = "") -> None:
        self.rows.append(
            {
                "optimisation": name,
                "on_s": on,
                "off_s": off,
                "speedup": off / on,
                "max_abs_diff": diff,
                "note": note,
                "section": self.section,
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                "command": command(),
            }
        )
        print(self.rows[-1], flush=True)

    def _model(self, path: str):
        from adapters.adapter_io import load_adapter
        from adapters.basemodel import load_base

        base, tok = load_base(None)
        return load_adapter(path, base, tok)

    def scoring(self) -> None:
        import torch

        from adapters.config import PromptFormat
        from adapters.scoring import _left_pad, choice_logits, encode, letter_token_ids, rows_for, score

        model, qs, S, R = self._model(self.a.adapter), self.qs, self.S, self.R
        tok = model.tokenizer
        score(model, qs[:2], samples=2)  # warm-up
        with torch.no_grad():
            on, x = timed(lambda: score(model, qs, samples=S, seed=0), R)
            off, y = timed(lambda: score(model, qs, samples=S, seed=0, batched=False), R)
            self.add(
                f"one forward for all S·B rows (vs S forwards of B rows), cloze, S={S}", on, off, _diff(x, y)
            )
            on, x = timed(lambda: score(model, qs, samples=S, seed=0), R)
            off, y = timed(lambda: score(model, qs, samples=S, seed=0, cloze_cache=False), R)
            self.add(
                "cloze: prompt once + K continuations from its KV cache (vs K full sequences)",
                on,
                off,
                _diff(x, y),
            )
            model.fmt = PromptFormat.from_dict({**model.fmt.to_dict(), "mode": "letter", "template": ""})
            enc = encode(qs, tok, model.fmt)
            items_r, samples_r = rows_for(len(qs), S)
            masks = model.draw_masks(S, 0)
            on, x = timed(lambda: choice_logits(model, enc, items_r, masks, samples_r), R)

            def full_head():  # the naive letter path: full logits at every position, then pick K letters
                ids, attn, pos = _left_pad([enc[i].prompt for i in items_r], tok.pad_token_id, "cpu")
                with model.row_masks(masks, samples_r):
                    logits = model.base(
                        input_ids=ids, attention_mask=attn, position_ids=pos
                    ).logits  # (R, L, V)
                return logits[:, -1, letter_token_ids(tok, model.fmt, x.shape[1])]

            off, y = timed(full_head, R)
            self.add(
                "letter: last position and only the K answer rows of lm_head (vs full logits)",
                on,
                off,
                _diff(x.numpy(), y.numpy()),
            )

    def _mixed(self):
        from server.backend import ScoreRequest

        return [
            ScoreRequest("d", it.question + (" Explain." * (12 * (i % 4))), it.choices, None, self.S, i)
            for i, it in enumerate(self.items[:24])
        ]

    def bucketing(self) -> None:  # through the HF backend as the server runs it
        from server.hf_backend import HFBackend
        from server.settings import Settings

        mixed, res = self._mixed(), {}
        for bucket in (True, False):
            be = HFBackend(Settings(length_bucketing=bucket, dtype="float32"))
            be.load_adapter("d", self.a.adapter)
            be.score(mixed[:2])
            res[bucket] = timed(lambda be=be: be.score(mixed), self.R)
        self.add(
            f"length bucketing (24 requests of mixed length, forwards of {Settings().max_forward_rows} rows)",
            res[True][0],
            res[False][0],
            _backend_diff(res[True][1], res[False][1]),
        )

    def threads(self) -> None:
        import torch

        from adapters.scoring import score

        threads = torch.get_num_threads()
        if threads < 2:
            return
        model, qs, S, R = self._model(self.a.adapter), self.qs, self.S, self.R
        with torch.no_grad():
            on, x = timed(lambda: score(model, qs, samples=S, seed=0), R)
            torch.set_num_threads(1)
            off, y = timed(lambda: score(model, qs, samples=S, seed=0), R)
            torch.set_num_threads(threads)
        self.add(f"torch threads {threads} (vs 1)", on, off, _diff(x, y))

    def top_l(self) -> None:
        import torch

        from adapters.scoring import choice_logits, encode, rows_for

        if not self.a.top_adapter:
            return
        top, S, R = self._model(self.a.top_adapter), self.S, self.R
        enc = encode(self.qs, top.tokenizer, top.fmt)
        items_r, samples_r = rows_for(len(self.qs), S)
        masks = top.draw_masks(S, 0)
        with torch.no_grad():
            on, x = timed(lambda: choice_logits(top, enc, items_r, masks, samples_r), R)
            off, y = timed(lambda: choice_logits(top, enc, items_r, masks, samples_r, shared_lower=False), R)
        self.add(
            f"top-L adapter: layers < {top.first_adapted_layer()} once per question (vs per row)",
            on,
            off,
            _diff(x.numpy(), y.numpy()),
        )

    def compile(self) -> None:
        """DALORRA_COMPILE through the HF backend: compile + warm-up at load, then the same 24 mixed requests."""
        from server.hf_backend import HFBackend
        from server.settings import Settings

        mixed, res, warm = self._mixed(), {}, {}
        for compiled in (True, False):
            be = HFBackend(Settings(compile=compiled, default_samples=self.S, dtype="float32"))
            t = time.perf_counter()
            be.load_adapter("d", self.a.adapter)
            warm[compiled] = time.perf_counter() - t
            be.score(mixed[:2])
            res[compiled] = timed(lambda be=be: be.score(mixed), self.R)
        self.add(
            "torch.compile of every layer's MLP + norms, warmed at load (vs eager)",
            res[True][0],
            res[False][0],
            _backend_diff(res[True][1], res[False][1]),
            f"adapter load incl. compile + warm-up {warm[True]:.0f} s vs {warm[False]:.0f} s eager",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=str(REPO / "adapters" / "default" / "arc-easy-dalorra"))
    ap.add_argument("--top-adapter", default=None, help="a top-L adapter for the shared-lower-layers row")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="measure only these sections"
    )
    a = ap.parse_args()
    b = Bench(a)
    for name in SECTIONS:
        if name in a.only:
            b.section = name
            getattr(b, name)()
    rows = b.rows
    old = RESULTS / "optimisations.json"
    if set(a.only) != set(SECTIONS) and old.is_file():  # keep the rows of sections not measured now
        prev = json.loads(old.read_text())
        for r in prev["rows"]:  # rows from before per-row provenance: the file's own command and date
            r.setdefault("command", prev["command"])
            r.setdefault("date", prev["machine"]["date"])
            r.setdefault("section", _section_of(r))
        rows = [r for r in prev["rows"] if r["section"] not in a.only] + rows
        rows.sort(key=lambda r: SECTIONS.index(r["section"]))
    table = [
        f"{a.questions} ARC-Easy validation questions, S = {a.samples}, median of {a.repeats}; adapter "
        f"`{a.adapter}`.",
        "",
        "| optimisation | on (s) | off (s) | speed-up | max abs diff | note |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['optimisation']} | {r['on_s']:.2f} | {r['off_s']:.2f} | {r['speedup']:.2f}× | "
        f"{r['max_abs_diff']:.1e} | {r.get('note', '')} |"
        for r in rows
    ]
    table += [
        "",
        "Rows of one section are measured side by side in one run; rows from different runs (see `date` "
        "and `command` of each row in the JSON) are not comparable in absolute seconds on this CPU, only their own on/off ratio.",
        "Result cache: a hit skips the backend entirely (tests/test_server.py checks the backend call count "
        "does not move); its speed-up is the whole request cost.",
    ]
    write(
        "optimisations",
        {
            "rows": rows,
            "questions": a.questions,
            "samples": a.samples,
            "repeats": a.repeats,
            "adapter": a.adapter,
            "top_adapter": a.top_adapter,
            "sections": a.only,
        },
        "\n".join(table),
    )
    print("\n".join(table))


def _section_of(row: dict) -> str:
    """Rows written before sections were recorded, by their name."""
    name = row["optimisation"]
    for key, sec in (
        ("bucketing", "bucketing"),
        ("threads", "threads"),
        ("top-L", "top_l"),
        ("compile", "compile"),
    ):
        if key in name:
            return sec
    return "scoring"


if __name__ == "__main__":
    main()
