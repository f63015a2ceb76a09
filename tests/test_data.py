"""Loading items: the benchmark sets by name from the Hugging Face hub (hub_data.py), on files made here.

No network: each test writes rows in the hub dataset's own schema to a local Parquet or JSON file, and the
hub call is answered by `datasets.load_dataset` reading that file, after checking that the loader asked for the
right dataset, config and split.
"""

from __future__ import annotations

import json
import sys

import pytest

from adapters.data import DataError, load_jsonl
from adapters.hub_data import lookup

ARC_ROWS = [
    {
        "id": "Mercury_1",
        "question": "Which of these is a star?",
        "choices": {"text": ["the Moon", "the Sun", "Mars"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
    {  # NY Regents items number their choices
        "id": "NYSEDREGENTS_2",
        "question": "Which is a liquid at room temperature?",
        "choices": {"text": ["iron", "salt", "water", "sand"], "label": ["1", "2", "3", "4"]},
        "answerKey": "3",
    },
]
# name → (hub dataset, config, split, rows in the hub's schema, file format, expected (id, question, choices, label))
CASES = {
    "arc_easy/validation": (
        "allenai/ai2_arc",
        "ARC-Easy",
        "validation",
        ARC_ROWS,
        "parquet",
        [
            ("Mercury_1", "Which of these is a star?", ("the Moon", "the Sun", "Mars"), 1),
            (
                "NYSEDREGENTS_2",
                "Which is a liquid at room temperature?",
                ("iron", "salt", "water", "sand"),
                2,
            ),
        ],
    ),
    "arc_challenge/train": (
        "allenai/ai2_arc",
        "ARC-Challenge",
        "train",
        ARC_ROWS[:1],
        "json",
        [("Mercury_1", "Which of these is a star?", ("the Moon", "the Sun", "Mars"), 1)],
    ),
    "openbookqa/dev": (
        "allenai/openbookqa",
        "main",
        "validation",
        [
            {
                "id": "7-57",
                "question_stem": "Gas can fill any container it is given, and liquid",
                "choices": {"text": ["is rigid", "takes its shape", "boils", "burns"], "label": list("ABCD")},
                "answerKey": "B",
            }
        ],
        "parquet",
        [
            (
                "7-57",
                "Gas can fill any container it is given, and liquid",
                ("is rigid", "takes its shape", "boils", "burns"),
                1,
            )
        ],
    ),
    "boolq/validation": (
        "google/boolq",
        None,
        "validation",
        [
            {
                "question": "is the sun a star",
                "answer": True,
                "passage": "The Sun is the star at the centre.",
            },
            {"question": "is the moon a star", "answer": False, "passage": "The Moon is a satellite."},
        ],
        "json",
        [
            (
                "boolq-validation-00000",
                "The Sun is the star at the centre.\nQuestion: is the sun a star?",
                ("no", "yes"),
                1,
            ),
            (
                "boolq-validation-00001",
                "The Moon is a satellite.\nQuestion: is the moon a star?",
                ("no", "yes"),
                0,
            ),
        ],
    ),
    "winogrande/train_s": (
        "allenai/winogrande",
        "winogrande_s",
        "train",
        [
            {
                "sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.",
                "option1": "Sarah",
                "option2": "Maria",
                "answer": "1",
            }
        ],
        "parquet",
        [
            (
                "winogrande-train_s-00000",
                "Sarah was a better surgeon than Maria so _ got the harder cases.",
                ("Sarah", "Maria"),
                0,
            )
        ],
    ),
    "winogrande/dev": (
        "allenai/winogrande",
        "winogrande_xl",
        "validation",
        [
            {
                "sentence": "The cup fell off the table because _ was tilted.",
                "option1": "the cup",
                "option2": "the table",
                "answer": "2",
            }
        ],
        "json",
        [
            (
                "winogrande-dev-00000",
                "The cup fell off the table because _ was tilted.",
                ("the cup", "the table"),
                1,
            )
        ],
    ),
    "mmlu_college_physics/test": (
        "cais/mmlu",
        "college_physics",
        "test",
        [
            {
                "question": "The quantum efficiency of a detector is 0.1; 100 photons arrive. It detects",
                "subject": "college_physics",
                "choices": ["10 ± 4", "10 ± 3", "10 ± 1", "10 ± 0.1"],
                "answer": 1,
            }
        ],
        "parquet",
        [
            (
                "mmlu-college_physics-test-0000",
                "The quantum efficiency of a detector is 0.1; 100 photons arrive. It detects",
                ("10 ± 4", "10 ± 3", "10 ± 1", "10 ± 0.1"),
                1,
            )
        ],
    ),
}


def _fake_hub(monkeypatch, tmp_path, want, rows, fmt="parquet"):
    """Make `datasets.load_dataset(path, config, split=...)` read `rows` from a local file, after checking the call."""
    import datasets

    f = tmp_path / f"rows.{fmt}"
    if fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(f))
    else:
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real, calls = datasets.load_dataset, []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        assert (path, name, split) == want
        return real(fmt, data_files=str(f), split="train", cache_dir=str(tmp_path / "hf-cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("DALORRA_DATA_DIR", str(tmp_path / "no-local-files"))
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_hub_sets_map_to_the_item_schema(name, tmp_path, monkeypatch):
    path, config, split, rows, fmt, expected = CASES[name]
    calls = _fake_hub(monkeypatch, tmp_path, (path, config, split), rows, fmt)
    items = load_jsonl(name)
    assert [(it.id, it.question, it.choices, it.label) for it in items] == expected
    assert calls == [(path, config, split)]
    assert len(load_jsonl(name + ".jsonl", limit=1)) == 1


def test_a_local_file_wins_over_the_hub(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, tmp_path, ("never", "called", "here"), ARC_ROWS)
    local = tmp_path / "no-local-files" / "arc_easy"
    local.mkdir(parents=True)
    (local / "validation.jsonl").write_text(
        json.dumps({"question": "q", "choices": ["a", "b"], "label": 1}) + "\n"
    )
    assert [it.question for it in load_jsonl("arc_easy/validation")] == ["q"]


def test_lookup_knows_the_sets_and_refuses_unlabelled_splits():
    assert lookup("winogrande/train_xl").config == "winogrande_xl"
    assert lookup("openbookqa/test").hub_split == "test"
    for name in ("boolq/test", "winogrande/test", "arc_easy/dev", "squad/validation", "a/b/c", "arc_easy"):
        assert lookup(name) is None, name


def test_hub_errors_say_what_to_do(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("DALORRA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="no such file"):  # not a hub name: the file error, unchanged
        load_jsonl("squad/validation")

    def offline(*a, **kw):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"allenai/ai2_arc.*hub unreachable.*DALORRA_DATA_DIR"):
        load_jsonl("arc_easy/test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_jsonl("arc_easy/test")


def test_a_row_that_does_not_fit_is_named(tmp_path, monkeypatch):
    rows = [dict(CASES["winogrande/dev"][3][0]), dict(CASES["winogrande/dev"][3][0], answer="")]
    _fake_hub(monkeypatch, tmp_path, ("allenai/winogrande", "winogrande_xl", "validation"), rows)
    with pytest.raises(DataError, match=r"winogrande/dev .* row 1: .*not 1 or 2"):
        load_jsonl("winogrande/dev")


def test_export_writes_jsonl_that_loads_back_without_the_hub(tmp_path, monkeypatch):
    from adapters.hub_data import export

    path, config, split, rows, fmt, expected = CASES["boolq/validation"]
    _fake_hub(monkeypatch, tmp_path, (path, config, split), rows, fmt)
    out = tmp_path / "exported"
    assert export(["boolq/validation"], out) == [out / "boolq" / "validation.jsonl"]
    monkeypatch.setenv("DALORRA_DATA_DIR", str(out))
    monkeypatch.setitem(sys.modules, "datasets", None)  # from here on, no hub and no `datasets`
    items = load_jsonl("boolq/validation")
    assert [(it.id, it.question, it.choices, it.label) for it in items] == expected
    assert json.loads((out / "boolq" / "validation.jsonl").read_text().splitlines()[0])["source"] == "boolq"
