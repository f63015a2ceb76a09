"""The benchmark sets by name from the Hugging Face hub, for users with the `datasets` library and hub access.

`arc_easy/validation`, `winogrande/train_s`, `mmlu_college_physics/test`, … name the same sets as the local JSONL
files (data.py): when no such file exists, `load_jsonl` asks here. Each hub set is mapped to the item schema the
same way the JSONL files were made, so an adapter trained on one reads the other alike:

    set                        hub dataset (config)               question / choices / label
    arc_easy, arc_challenge    allenai/ai2_arc (ARC-Easy|…)       question / choices.text / answerKey's position
    openbookqa                 allenai/openbookqa (main)          question_stem / choices.text / answerKey's position
    boolq                      google/boolq                       passage + "\\nQuestion: " + question + "?" / no, yes
    winogrande                 allenai/winogrande (winogrande_*)  sentence / option1, option2 / answer − 1
    mmlu_<subject>             cais/mmlu (<subject>)              question / choices / answer

Split names follow the JSONL files: OpenBookQA's and WinoGrande's `dev` is the hub's `validation`; WinoGrande's
training sizes are `train_xs` … `train_xl`. Test splits without public labels (WinoGrande, BoolQ) are not offered.

`python -m adapters.hub_data arc_easy/train arc_easy/validation [--out DIR]` writes splits as JSONL files, for a
machine without hub access.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, Item

Row = dict


def _letter_choices(question: str) -> Callable[[Row, str, int], dict]:
    def convert(row: Row, split: str, i: int) -> dict:
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
        return {
            "id": row["id"],
            "question": row[question],
            "choices": list(row["choices"]["text"]),
            "label": labels.index(row["answerKey"]),
        }

    return convert


def _boolq(row: Row, split: str, i: int) -> dict:
    # The passage goes into the question, as in the JSONL files (BLoB's prompt); BoolQ questions lack a "?".
    return {
        "id": f"boolq-{split}-{i:05d}",
        "question": f"{row['passage']}\nQuestion: {row['question']}?",
        "choices": ["no", "yes"],
        "label": int(bool(row["answer"])),
    }


def _winogrande(row: Row, split: str, i: int) -> dict:
    if str(row["answer"]) not in ("1", "2"):
        raise ValueError(f"answer {row['answer']!r} is not 1 or 2 (an unlabelled test row?)")
    return {
        "id": f"winogrande-{split}-{i:05d}",
        "question": row["sentence"],
        "choices": [row["option1"], row["option2"]],
        "label": int(row["answer"]) - 1,
    }


def _mmlu(row: Row, split: str, i: int) -> dict:
    return {
        "id": f"mmlu-{row['subject']}-{split}-{i:04d}",
        "question": row["question"],
        "choices": list(row["choices"]),
        "label": int(row["answer"]),
    }


@dataclass(frozen=True)
class HubSet:
    """One benchmark on the hub: where it lives and how a row becomes an item."""

    path: str  # hub dataset id
    splits: dict[str, tuple[str | None, str]]  # our split name → (hub config, hub split)
    convert: Callable[[Row, str, int], dict]  # (row, our split, row index) → Item fields


def _same_config(config: str | None, **splits: str) -> dict[str, tuple[str | None, str]]:
    return {ours: (config, theirs) for ours, theirs in splits.items()}


_ARC_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
_WG_SIZES = ("xs", "s", "m", "l", "xl")

SETS: dict[str, HubSet] = {
    "arc_easy": HubSet(
        "allenai/ai2_arc", _same_config("ARC-Easy", **_ARC_SPLITS), _letter_choices("question")
    ),
    "arc_challenge": HubSet(
        "allenai/ai2_arc", _same_config("ARC-Challenge", **_ARC_SPLITS), _letter_choices("question")
    ),
    "openbookqa": HubSet(
        "allenai/openbookqa",
        _same_config("main", train="train", dev="validation", validation="validation", test="test"),
        _letter_choices("question_stem"),
    ),
    "boolq": HubSet("google/boolq", _same_config(None, train="train", validation="validation"), _boolq),
    "winogrande": HubSet(
        "allenai/winogrande",
        {f"train_{s}": (f"winogrande_{s}", "train") for s in _WG_SIZES}
        | {"dev": ("winogrande_xl", "validation"), "validation": ("winogrande_xl", "validation")},
        _winogrande,
    ),
}
MMLU_PREFIX = "mmlu_"
MMLU_SPLITS = _same_config(None, dev="dev", validation="validation", test="test")


@dataclass(frozen=True)
class HubSplit:
    """A named split (`arc_easy/validation`) resolved to where the hub keeps it."""

    name: str  # our set name, e.g. arc_easy
    split: str  # our split name, e.g. dev
    path: str
    config: str | None
    hub_split: str
    convert: Callable[[Row, str, int], dict]

    def to_items(self, rows: Iterable[Row], limit: int | None = None) -> list[Item]:
        """Convert hub rows to items; a row that does not fit the schema is an error naming the set and row."""
        items: list[Item] = []
        for i, row in enumerate(rows):
            if limit is not None and len(items) >= limit:
                break
            try:
                f = self.convert(row, self.split, i)
                items.append(Item(f["question"], tuple(f["choices"]), f["label"], str(f["id"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self}: row {i}: {type(exc).__name__}: {exc}") from None
        if not items:
            raise DataError(f"{self}: no items")
        return items

    def __str__(self) -> str:
        return f"{self.name}/{self.split} ({self.path}, {self.config or 'default'}, split {self.hub_split})"


def lookup(name: str | os.PathLike) -> HubSplit | None:
    """`set/split` (as the JSONL files are named) → its hub location; None when it names no hub set."""
    head, _, split = str(name).removesuffix(".jsonl").rpartition("/")
    if head.startswith(MMLU_PREFIX) and split in MMLU_SPLITS:
        return HubSplit(head, split, "cais/mmlu", head.removeprefix(MMLU_PREFIX), split, _mmlu)
    spec = SETS.get(head)
    if spec is None or split not in spec.splits:
        return None
    config, hub_split = spec.splits[split]
    return HubSplit(head, split, spec.path, config, hub_split, spec.convert)


def load_hub(name: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """Items of a named benchmark split from the hub (cached by `datasets` after the first download)."""
    where = lookup(name)
    if where is None:
        known = ", ".join(sorted(SETS))
        raise DataError(
            f"{name}: not a benchmark the hub loader knows ({known}, mmlu_<subject>; then /split)"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: no such file, and loading it from the Hugging Face hub needs the `datasets` library "
            "(pip install datasets). Or put the JSONL files in $DALORRA_DATA_DIR."
        ) from None
    try:
        rows = datasets.load_dataset(where.path, where.config, split=where.hub_split)
    except Exception as exc:  # hub unreachable, unknown config, … : several types
        raise DataError(
            f"{where}: could not load it from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without hub access, put the JSONL files in $DALORRA_DATA_DIR."
        ) from None
    return where.to_items(rows, limit)


def export(names: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """Write named hub splits as JSONL files `<out_dir>/<set>/<split>.jsonl` (for a machine without hub access:
    export where the hub is reachable, copy, point $DALORRA_DATA_DIR there)."""
    written = []
    for name in names:
        where = lookup(name)
        if where is None:
            raise DataError(f"{name}: not a benchmark the hub loader knows")
        items = load_hub(name)
        path = Path(out_dir) / where.name / f"{where.split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for it in items:
                row = {"id": it.id, "question": it.question, "choices": list(it.choices), "label": it.label}
                f.write(json.dumps(row | {"source": where.name}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m adapters.hub_data",
        description="Write benchmark splits from the Hugging Face hub as dalorra's JSONL files.",
    )
    ap.add_argument(
        "names", nargs="+", help="set/split, e.g. arc_easy/train arc_easy/validation winogrande/dev"
    )
    ap.add_argument(
        "--out", default=None, help="directory (default: $DALORRA_DATA_DIR, else ~/.cache/dalorra/datasets)"
    )
    a = ap.parse_args()
    from .data import default_data_dir

    for p in export(a.names, a.out or default_data_dir()):
        print(p)
