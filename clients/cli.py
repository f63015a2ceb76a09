"""`dalorra predict`: one question (a readable table or JSON) or a JSONL batch with a progress bar.

Needs only httpx, pydantic and tqdm (`pip install 'dalorra[client]'`): no torch, no NumPy."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.protocol import PredictResponse


DEFAULT_URL = "http://127.0.0.1:8000"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one to show: not for unset options, flags, or help that names its own
    default (which also keeps a token taken from the environment out of the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in help_:
            return help_
        return super()._get_help_string(action)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="ask a running server (one question, or a JSONL file)",
        description="Ask a running dalorra server: one question (a table, or --json), or a JSONL file of items "
        "(--file) with a progress bar and a summary.",
        epilog="environment: DALORRA_URL (the server URL), DALORRA_API_TOKEN (the bearer token)",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--url",
        default=os.environ.get("DALORRA_URL", DEFAULT_URL),
        help=f"server URL (default: $DALORRA_URL, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("DALORRA_API_TOKEN"),
        help="bearer token (default: $DALORRA_API_TOKEN)",
    )
    p.add_argument("--question", help="the question")
    p.add_argument("--choice", action="append", default=[], help="an answer choice (repeat 2-26 times)")
    p.add_argument("--context", default=None, help="optional passage")
    p.add_argument("--adapter", default=None, help="adapter name (default: the server's)")
    p.add_argument("--samples", type=int, default=None, help="mask samples S (the maximum with --adaptive)")
    p.add_argument(
        "--adaptive",
        action="store_true",
        default=None,
        help="adaptive sampling: stop drawing once more samples cannot change the outcome",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--file", default=None, help="JSONL of items (question, choices, optional label and id)")
    p.add_argument(
        "--out",
        default=None,
        help="append one JSON result (with its receipt) per line here as "
        "answers arrive; rerun to resume (with --file)",
    )
    p.add_argument("--batch", type=int, default=8, help="items per request (with --file)")
    p.add_argument(
        "--feedback",
        action="store_true",
        help="send each labelled item's label to /feedback, so the server's live calibration counts it (with --file)",
    )
    p.set_defaults(func=_predict)


def _bar(p: float, width: int = 30) -> str:
    n = round(p * width)
    return "█" * n + "·" * (width - n)


def render(r: PredictResponse, choices: list[str]) -> str:
    lines = []
    for i, (c, p) in enumerate(zip(choices, r.probabilities, strict=True)):
        mark = "→" if i == r.answer_index else " "
        lines.append(f"{mark} {chr(65 + i)}. {c[:40]:<40} {_bar(p)} {p:6.1%}")
    lines.append(
        f"confidence {r.confidence:.3f}   entropy {r.entropy_norm:.3f}   "
        f"epistemic {r.epistemic_norm:.3f}   (normalised by log K; S = {r.samples})"
    )
    reason = f" ({r.abstain_reason})" if r.abstain_reason else ""
    lines.append(f"decision: {r.decision.upper()}{reason}   answer: {r.answer}")
    return "\n".join(lines)


def _predict(a: argparse.Namespace) -> int:
    from .client import Client, DalorraError

    if a.feedback and not a.file:
        print("dalorra predict: --feedback sends the labels of a --file; give --file", file=sys.stderr)
        return 2
    if a.batch < 1:
        print(f"dalorra predict: --batch {a.batch}: give at least 1", file=sys.stderr)
        return 2
    with Client(a.url, token=a.token) as c:
        try:
            if a.file:
                from .batch import run_batch

                return run_batch(c, a)
            if not a.question or len(a.choice) < 2:
                print(
                    "dalorra predict: give --question and at least two --choice (or --file)", file=sys.stderr
                )
                return 2
            kw = {
                k: v
                for k, v in (
                    ("context", a.context),
                    ("adapter", a.adapter),
                    ("samples", a.samples),
                    ("adaptive", a.adaptive),
                )
                if v
            }
            r = c.predict(a.question, a.choice, **kw)
        except DalorraError as exc:
            print(f"dalorra predict: {exc}", file=sys.stderr)
            return 1
    print(r.model_dump_json(indent=2) if a.json else render(r, a.choice))
    return 0
