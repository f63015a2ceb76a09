"""The benchmark scripts' own logic that decides what is compared with what (no training here)."""

import pytest

from adapters.train import TrainConfig, load_splits
from bench.budget import capped_train, method_knobs


def test_method_spec_sets_exactly_one_knob_and_rejects_unknown_ones():
    assert method_knobs("lora") == {"method": "lora"}
    assert method_knobs("dalorra@top8") == {"method": "dalorra", "top_layers": 8}
    assert method_knobs("dalorra@p0=0.9") == {"method": "dalorra", "p0": 0.9}
    with pytest.raises(SystemExit, match="KNOB=VALUE"):
        method_knobs("dalorra@not_a_field=1")


def test_small_training_set_keeps_the_usual_held_out_split_and_never_trains_on_it(tmp_path):
    paths = capped_train("arc_easy", 0, 40, root=tmp_path)
    usual = load_splits(TrainConfig(out=str(tmp_path / "a"), train="arc_easy/train"))
    small = load_splits(
        TrainConfig(out=str(tmp_path / "b"), train=paths["train"], calibration=paths["calibration"])
    )
    assert [it.id for it in small[2]] == [it.id for it in usual[2]]  # the same held-out items, same order
    assert small[2] == usual[2]
    assert [it.id for it in small[0]] == [it.id for it in usual[0][:40]]
    assert not {it.id for it in small[0]} & {it.id for it in small[2]}
