"""Multiple-choice items: one JSON object a line, validated row by row.

    {"id": "Mercury_7175875", "question": "...", "choices": ["...", "..."], "label": 2, "source": "arc_challenge"}

`label` is the 0-based index of the right choice (optional for prediction); `context` is an optional passage.
A path is a file, or `set/split` (e.g. arc_easy/validation) under the data directory ($DALORRA_DATA_DIR, else
<cache>/datasets); a `set/split` that is not there is loaded from the Hugging Face hub when the `datasets` library is
installed (hub_data.py).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .basemodel import cache_dir

MIN_CHOICES, MAX_CHOICES = 2, 26


class DataError(ValueError):
    """A data file or row is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, ...]
    label: int | None = None
    id: str = ""
    context: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question must be a non-empty string")
        if not (MIN_CHOICES <= len(self.choices) <= MAX_CHOICES):
            raise ValueError(f"{len(self.choices)} choices; need {MIN_CHOICES} to {MAX_CHOICES}")
        for c in self.choices:
            if not isinstance(c, str) or not c.strip():
                raise ValueError("every choice must be a non-empty string")
        if self.label is not None and not (
            isinstance(self.label, int) and 0 <= self.label < len(self.choices)
        ):
            raise ValueError(f"label {self.label!r} is not an index into {len(self.choices)} choices")
        object.__setattr__(self, "choices", tuple(self.choices))


def default_data_dir() -> Path:
    """$DALORRA_DATA_DIR, else `datasets` in dalorra's cache directory (~/.cache/dalorra/datasets)."""
    env = os.environ.get("DALORRA_DATA_DIR")
    return Path(env) if env else cache_dir() / "datasets"


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given, or `name/split` relative to the data directory (e.g. arc_easy/validation)."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (default_data_dir() / p, default_data_dir() / f"{p}.jsonl"):
        if cand.is_file():
            return cand
    raise DataError(
        f"{path}: no such file (also looked in {default_data_dir()}; set DALORRA_DATA_DIR, or install `datasets` "
        "to load the benchmark sets by name from the Hugging Face hub)"
    )


def load_jsonl(path: str | os.PathLike, limit: int | None = None, require_labels: bool = True) -> list[Item]:
    """Items from a JSONL file, or from `set/split` in the data directory, else from the hub (hub_data.py)."""
    try:
        p = resolve_path(path)
    except DataError:
        from .hub_data import load_hub, lookup

        if lookup(path) is None:
            raise
        return load_hub(path, limit)
    items: list[Item] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object")
            missing = [k for k in ("question", "choices") if k not in row]
            if require_labels and "label" not in row:
                missing.append("label")
            if missing:
                raise DataError(f"{p}:{lineno}: missing field(s) {missing}")
            if not isinstance(row["choices"], list):
                raise DataError(f"{p}:{lineno}: 'choices' must be a list of strings")
            try:
                items.append(
                    Item(
                        question=row["question"],
                        choices=tuple(row["choices"]),
                        label=row.get("label"),
                        id=str(row.get("id", f"{p.stem}-{lineno}")),
                        context=row.get("context"),
                    )
                )
            except ValueError as exc:
                raise DataError(f"{p}:{lineno}: {exc}") from None
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise DataError(f"{p}: no items")
    return items


def split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded split: (rest, held_out) with round(fraction·n) items held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction {fraction} must be in (0, 1)")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(fraction * len(items)))
    held = set(idx[:n])
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
