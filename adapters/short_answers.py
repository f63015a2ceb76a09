"""Short-answer questions made from multiple-choice items, and the offline fit of the generation thresholds on them.

A multiple-choice item becomes a short-answer question when its gold choice is a phrase of at most
MAX_ANSWER_WORDS words, the question ends with '?', and it does not need the choices to make sense ("which of the
following …"). The adapter answers from its own cloze prompt (a letter-mode adapter: the default cloze prompt),
greedily, stopping at a newline; correct = normalised exact match (lower case, no punctuation or articles).

`fit_generation_thresholds` runs exactly what the server runs for such a request (adapters/generate.py: mean-mask
decoding, then the S-mask teacher-forced pass; adapters/generation.py: summary) and fits the confidence and
epistemic thresholds with the choice thresholds' procedure. `dalorra train` fits them on its calibration split,
`dalorra eval --generation-set` on any set; both write the record the server reads (generation_decision.json).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .config import CLOZE_TEMPLATE, PromptFormat
from .data import DataError, Item
from .generation import GenerateRequest, fit_generation_decision, summarize_answer, thresholds_of

if TYPE_CHECKING:
    from .model import DalorraModel

MAX_ANSWER_WORDS = 3
STOP = ("\n",)
NEEDS_CHOICES = re.compile(
    r"which of (the following|these)|best (describes|explains)|which statement|which two|"
    r"which pair|which sentence|which list",
    re.I,
)
SHORT_ANSWER = (
    f"a gold choice of at most {MAX_ANSWER_WORDS} words and a question that ends with '?' and does not "
    "need its choices"
)
DECISION_FILE = "generation_decision.json"  # in the adapter directory; the server reads it


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the exact-match form of an answer."""
    t = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in t.split() if w not in ("a", "an", "the"))


def exact_match(answer: str, gold: str) -> bool:
    return normalise(answer) == normalise(gold)


def gold_answer(item: Item) -> str:
    return item.choices[item.label]


def is_short_answer(item: Item) -> bool:
    return (
        item.label is not None
        and len(gold_answer(item).split()) <= MAX_ANSWER_WORDS
        and item.question.rstrip().endswith("?")
        and not NEEDS_CHOICES.search(item.question)
    )


def short_answer_items(items: Iterable[Item], limit: int | None = None) -> list[Item]:
    """The short-answer questions among `items`, in order, at most `limit` of them."""
    out = []
    for it in items:
        if limit is not None and len(out) >= limit:
            break
        if is_short_answer(it):
            out.append(it)
    return out


def short_answer_prompt(item: Item, fmt: PromptFormat) -> str:
    """The adapter's cloze prompt without choices (letter-mode adapters: the default cloze template)."""
    template = fmt.template if fmt.mode == "cloze" else CLOZE_TEMPLATE
    text = template.format(question=item.question, choices="", context=item.context or "")
    return f"{item.context}\n{text}" if item.context and "{context}" not in template else text


def short_answer_request(
    item: Item, fmt: PromptFormat, adapter: str, samples: int, max_tokens: int = 16, mask_seed: int = 0
) -> GenerateRequest:
    """The request the server would get for this question (greedy, stop at a newline)."""
    return GenerateRequest(
        adapter=adapter,
        prompt=short_answer_prompt(item, fmt),
        max_tokens=max_tokens,
        temperature=0.0,
        stop=STOP,
        samples=samples,
        mask_seed=mask_seed,
    )


def answer_short(
    model: DalorraModel,
    items: list[Item],
    adapter: str,
    samples: int,
    max_tokens: int = 16,
    mask_seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Generate and score every item's answer; one row per item: id, gold, answer, correct and the summary."""
    from .generate import generate  # torch: imported when answers are generated

    was_training = model.training
    model.eval()
    rows = []
    for it in tqdm(
        items, desc="generation thresholds", disable=not progress, leave=False, dynamic_ncols=True
    ):
        c = generate(
            model, short_answer_request(it, model.fmt, adapter, samples, max_tokens, mask_seed)
        ).choices[0]
        gold = gold_answer(it)
        rows.append(
            {
                "id": it.id,
                "gold": gold,
                "answer": c.text,
                "correct": exact_match(c.text, gold),
                **summarize_answer(c.scores),
            }
        )
    model.train(was_training)
    return rows


def fit_generation_thresholds(
    model: DalorraModel,
    items: list[Item],
    *,
    adapter: str = "",
    source: str,
    limit: int | None,
    samples: int,
    target_error: float,
    delta: float = 0.1,
    max_tokens: int = 16,
    mask_seed: int = 0,
    progress: bool = True,
) -> dict:
    """The generation decision record (the file the server reads) fitted on the short-answer items of `items`."""
    if samples < 1:
        raise ValueError(f"samples={samples}: the generation thresholds need the uncertainty pass (S >= 1)")
    available = short_answer_items(items)
    chosen = available[:limit]
    if not chosen:
        raise DataError(f"{source}: no short-answer items among its {len(items)} ({SHORT_ANSWER})")
    rows = answer_short(model, chosen, adapter, samples, max_tokens, mask_seed, progress)
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    record = fit_generation_decision(
        np.array([r["confidence"] for r in rows]),
        np.array([r["epistemic_mean"] for r in rows]),
        correct,
        target_error,
        delta,
        entropy_mean=np.array([r["entropy_mean"] for r in rows]),  # the unfamiliarity reference
    )
    record.update(
        {
            "fitted_on": {
                "set": source,
                "items": len(rows),
                "short_answer_items": len(available),
                "set_items": len(items),
                "accuracy": float(correct.mean()),
                "correct": "normalised exact match",
            },
            "request": {
                "prompt": "the adapter's cloze prompt",
                "temperature": 0.0,
                "stop": list(STOP),
                "max_tokens": max_tokens,
                "samples": samples,
                "mask_seed": mask_seed,
            },
            "scores": "raw next-token distributions (temperature 1; the adapter's choice temperature applies to "
            "K-way choices only, on the server as here)",
        }
    )
    return record


def decision_summary(record: dict) -> dict:
    """What dalorra.json keeps of a generation decision record (the whole record is generation_decision.json)."""
    conf_t, epi_t = thresholds_of(record)
    return {
        **record["fitted_on"],
        "min_confidence": conf_t,
        "max_epistemic": epi_t,
        "target_error": record["confidence"]["target_error"],
        "samples": record["request"]["samples"],
    }
