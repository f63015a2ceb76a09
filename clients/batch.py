"""`dalorra predict --file`: a JSONL batch written as it goes and resumed where it stopped.

Each answer is appended to --out (flushed) the moment it arrives, receipt included, so an interrupted run
loses nothing: run the same command again and the items already in --out are skipped. With --feedback, each labelled
item's label goes to /feedback as its answer arrives (the server's live calibration then counts it); a resumed run
also reports the labels an earlier run did not. The summary covers
every item in --out, and reports accuracy on all labelled items and on the answered ones (the accuracy
a user of the abstain decision gets).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from adapters.data import Item

    from .client import Client


def _key(it: Item, index: int) -> str:
    return it.id if it.id else f"line-{index + 1}"  # echoed back as the response id, so a resume finds it


def _done(path: str | None) -> dict[str, dict]:
    """Rows already written by an earlier run (a torn last line, from a kill mid-write, is dropped)."""
    rows: dict[str, dict] = {}
    if not path or not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def run_batch(c: Client, a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from adapters.data import load_jsonl

    items = load_jsonl(a.file, require_labels=False)
    keys = [_key(it, i) for i, it in enumerate(items)]
    done = _done(a.out)
    todo = [(k, it) for k, it in zip(keys, items, strict=True) if k not in done]
    if done:
        print(
            f"dalorra predict: resuming, {len(items) - len(todo)} of {len(items)} items already in {a.out}",
            file=sys.stderr,
        )
    feedback = Feedback(c) if getattr(a, "feedback", False) else None
    if feedback:  # labels of answers an earlier run got but did not report (the server ignores duplicates)
        for k in keys:
            if k in done:
                feedback.send(done[k])
    if a.out and done:  # rewrite without a torn last line (and with feedback marks) before appending
        with open(a.out, "w") as f:
            f.writelines(json.dumps(done[k]) + "\n" for k in keys if k in done)
    out = open(a.out, "a") if a.out else None
    rows = dict(done)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="predict", unit="item")
    try:
        for i in range(0, len(todo), a.batch):
            chunk = todo[i : i + a.batch]
            body = [
                {
                    "question": it.question,
                    "choices": list(it.choices),
                    "context": it.context,
                    "id": k,
                    "adapter": a.adapter,
                    "samples": a.samples,
                    "adaptive": a.adaptive,
                }
                for k, it in chunk
            ]
            for (k, it), r in zip(chunk, c.predict_many(body), strict=True):
                row = {**r.model_dump(), "label": it.label}  # the receipt stays: feedback can follow
                if feedback:
                    feedback.send(row)
                rows[k] = row
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
            bar.update(len(chunk))
    except KeyboardInterrupt:
        if out:
            print(
                f"\ndalorra predict: interrupted; {len(rows)} of {len(items)} results are in {a.out}: run the "
                "same command again to resume",
                file=sys.stderr,
            )
        return 130
    finally:
        bar.close()
        if out:
            out.close()
    summary = summarize([rows[k] for k in keys if k in rows], len(items))
    if feedback:
        summary["feedback"] = dict(feedback.counts)
    print(json.dumps(summary))
    return 0


class Feedback:
    """Sends a labelled row's label to /feedback once, marking the row (`feedback`: accepted | duplicate | the error),
    so a resumed run sends only what is missing. One refused label is reported, not fatal to the batch."""

    def __init__(self, c: Client):
        self.c = c
        self.counts: Counter[str] = Counter()

    def send(self, row: dict) -> None:
        if row.get("label") is None or row.get("feedback") in ("accepted", "duplicate"):
            return
        from .client import DalorraError

        try:
            r = self.c.feedback(row["receipt"], row["label"])
            row["feedback"] = "duplicate" if r.duplicate else "accepted"
        except DalorraError as exc:
            row["feedback"] = f"error: {exc}"
            print(f"dalorra predict: feedback for {row.get('id')!r} refused: {exc}", file=sys.stderr)
        self.counts[row["feedback"].split(":")[0]] += 1


def summarize(rows: list[dict], total: int) -> dict:
    answered = [r for r in rows if r["decision"] == "answer"]
    summary = {
        "items": total,
        "done": len(rows),
        "answered": len(answered),
        "abstained": len(rows) - len(answered),
    }
    labelled = [r for r in rows if r.get("label") is not None]
    if labelled:
        acc, ece = accuracy_and_ece([r["probabilities"] for r in labelled], [r["label"] for r in labelled])
        summary.update(labelled=len(labelled), accuracy=acc, ece=ece)
        ans = [r for r in labelled if r["decision"] == "answer"]
        summary.update(
            labelled_answered=len(ans),
            accuracy_answered=sum(r["answer_index"] == r["label"] for r in ans) / len(ans) if ans else None,
        )
    return summary


def accuracy_and_ece(probs: list[list[float]], labels: list[int], n_bins: int = 15) -> tuple[float, float]:
    """ACC and ECE exactly as adapters.calibration.metrics defines them (top-1 confidence in 15 equal-width
    bins; ECE = Σ_bins |Σconf − Σcorrect| / n), in plain Python because the client installs without NumPy.
    tests/test_install.py checks the two agree."""
    conf_sum, correct_sum = [0.0] * n_bins, [0.0] * n_bins
    for p, y in zip(probs, labels, strict=True):
        top = max(range(len(p)), key=p.__getitem__)  # the first maximum, as np.argmax
        b = min(max(int(p[top] * n_bins), 0), n_bins - 1)
        conf_sum[b] += p[top]
        correct_sum[b] += float(top == y)
    n = len(labels)
    return sum(correct_sum) / n, sum(abs(c - a) for c, a in zip(conf_sum, correct_sum, strict=True)) / n
