"""Example application: answer quiz questions with the model when it is sure, ask a 'human' otherwise.

Run it:

    dalorra serve &            # in another terminal
    python clients/examples/route_app.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import os

from clients.client import Client
from clients.router import AbstainRouter
from server.protocol import PredictResponse

QUESTIONS = [
    ("Which of these is a source of light?", ["the Sun", "the Moon", "a mirror", "a rock"], 0),
    ("What do plants need to make food?", ["sunlight", "sand", "plastic", "salt"], 0),
    ("Which unit measures temperature?", ["degrees Celsius", "meters", "grams", "liters"], 0),
]


def ask_a_human(question: str, choices: list[str], prediction: PredictResponse) -> int:
    """The fallback: return the INDEX of the right answer in `choices` (AbstainRouter sends it to /feedback as the
    label). A real application would page a person or ask a larger model; here the answer key stands in."""
    return next(k for q, _, k in QUESTIONS if q == question)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--url", default=os.environ.get("DALORRA_URL", "http://127.0.0.1:8000"), help="server URL"
    )
    ap.add_argument("--min-confidence", type=float, default=None, help="override the adapter's threshold")
    a = ap.parse_args()
    kw = {"min_confidence": a.min_confidence} if a.min_confidence is not None else {}
    with Client(a.url) as client:
        router = AbstainRouter(client, fallback=ask_a_human, **kw)
        for q, choices, _ in QUESTIONS:
            r = router.route(q, choices)
            print(f"{q!r}: {r.answer!r} via {r.path} (confidence {r.prediction.confidence:.2f})")
        print("paths:", dict(router.counts))


if __name__ == "__main__":
    main()
