"""Many adapters on one base (adapters/multi.py): attaching equals injecting, and a mixed-adapter forward gives
every row what its own adapter alone gives, in every scoring path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.adapter_io import load_adapter, save_adapter
from adapters.config import AdapterConfig, PromptFormat
from adapters.model import DalorraModel
from adapters.multi import AdapterSlot, MixedView, SharedBase
from adapters.scoring import DrawRequest, encode, score_draws
from tests.conftest import make_tiny, randomize_lora
from tests.test_scoring import MIXED

ATOL = 2e-5


def _adapter(tmp_path, tokenizer, name, seed, mode="cloze", **cfg):
    model = DalorraModel(make_tiny(), tokenizer, AdapterConfig(**cfg), PromptFormat(mode=mode), seed=seed)
    randomize_lora(model, seed=seed, std=0.3)
    return save_adapter(model, tmp_path / name)


def _owned(path, tokenizer):
    return load_adapter(path, make_tiny(), tokenizer)


def _shared(paths, tokenizer):
    shared = SharedBase(make_tiny(), tokenizer)
    models = [load_adapter(p, shared.base, tokenizer, shared=shared) for p in paths]
    return shared, models


@pytest.fixture(scope="module")
def three(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("multi")
    return [
        _adapter(d, tokenizer, "a", 1),
        _adapter(d, tokenizer, "b", 2, r=4, targets=("q_proj", "v_proj")),
        _adapter(d, tokenizer, "c", 3, method="lora", stochastic=False, targets=("v_proj", "lm_head")),
    ]


def test_attaching_leaves_the_base_alone_and_adds_only_factors(three, tokenizer):
    shared, models = _shared(three, tokenizer)
    names = {n for m in models for n in m.adapted}
    assert set(shared.slots) == names  # one slot per module any adapter targets, shared by all of them
    assert all(isinstance(shared.base.get_submodule(n), AdapterSlot) for n in names)
    base_params = {id(p) for p in shared.base.parameters()}
    for m in models:  # no adapter parameter is in the base, no base parameter copied into an adapter
        for layer in m.adapted.values():
            assert id(layer.lora_A) not in base_params and id(layer.lora_B) not in base_params
            assert (
                layer.base_layer
                is shared.slots[next(k for k, v in m.adapted.items() if v is layer)].base_layer
            )
    # outside any route the shared base is the plain base model
    ids = torch.tensor([[1, 5, 9, 11]])
    plain = make_tiny()
    assert torch.allclose(shared.base(ids).logits, plain(ids).logits, atol=1e-6)


@pytest.mark.parametrize("mode", ["cloze", "letter"])
def test_a_mixed_batch_equals_each_adapter_alone(tmp_path, tokenizer, mode):
    paths = [
        _adapter(tmp_path, tokenizer, "a", 1, mode=mode),
        _adapter(tmp_path, tokenizer, "b", 2, mode=mode, r=4, targets=("q_proj", "v_proj")),
        _adapter(tmp_path, tokenizer, "c", 3, mode=mode, method="lora", stochastic=False),
    ]
    enc = encode(MIXED[:3], tokenizer, PromptFormat(mode=mode))
    reqs = [
        DrawRequest([enc[0]], 4, 7),
        DrawRequest([enc[1], enc[2]], 3, 11),
        DrawRequest([enc[2]], 2, 5, first=1),
    ]
    want = [score_draws(_owned(p, tokenizer), [r])[0] for p, r in zip(paths, reqs, strict=True)]
    shared, models = _shared(paths, tokenizer)
    view = MixedView(shared, models)
    got = score_draws(view, reqs, adapters=models)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.allclose(g, w, atol=ATOL)
    # the same rows in another order and beside another adapter's rows: the same answers
    again = score_draws(view, reqs[::-1], adapters=models[::-1])[::-1]
    for g, w in zip(again, want, strict=True):
        assert np.allclose(g, w, atol=ATOL)


def test_a_single_attached_adapter_scores_as_an_injected_one(three, tokenizer):
    enc = encode(MIXED[:2], tokenizer, PromptFormat())
    shared, models = _shared(three, tokenizer)
    for path, m in zip(three, models, strict=True):
        want = score_draws(_owned(path, tokenizer), [DrawRequest(enc, 5, 3)])[0]
        got = score_draws(m, [DrawRequest(enc, 5, 3)])[0]
        assert np.allclose(got, want, atol=ATOL)


def test_detaching_an_adapter_leaves_the_others_unchanged(three, tokenizer):
    enc = encode(MIXED[:2], tokenizer, PromptFormat())
    shared, models = _shared(three, tokenizer)
    before = score_draws(models[0], [DrawRequest(enc, 3, 1)])[0]
    shared.detach(models[1])
    assert all(
        layer not in [x for s in shared.slots.values() for x, _ in s.route]
        for layer in models[1].adapted.values()
    )
    assert np.allclose(score_draws(models[0], [DrawRequest(enc, 3, 1)])[0], before, atol=ATOL)


def test_a_mixed_view_refuses_adapters_with_different_scoring_modes(tmp_path, tokenizer):
    paths = [
        _adapter(tmp_path, tokenizer, "a", 1, mode="cloze"),
        _adapter(tmp_path, tokenizer, "b", 2, mode="letter"),
    ]
    shared, models = _shared(paths, tokenizer)
    with pytest.raises(ValueError, match="prompt mode"):
        MixedView(shared, models)


def test_injecting_into_a_shared_base_is_refused(three, tokenizer):
    shared, _ = _shared(three[:1], tokenizer)
    with pytest.raises(ValueError, match="attach with shared="):
        DalorraModel(shared.base, tokenizer, AdapterConfig(), PromptFormat())


def test_top_layer_and_mc_dropout_adapters_mix_too(tmp_path, tokenizer):
    """The shared-lower-layers path (every adapter above layer 1) and seeded MC dropout rows in one forward."""
    paths = [
        _adapter(tmp_path, tokenizer, "top", 1, layers=(1,), targets=("q_proj", "v_proj")),
        _adapter(
            tmp_path, tokenizer, "mc", 2, method="mcdropout", stochastic=False, dropout=0.2, layers=(1,)
        ),
    ]
    enc = encode(MIXED[:2], tokenizer, PromptFormat())
    reqs = [DrawRequest(enc, 3, 4), DrawRequest([enc[1]], 4, 9)]
    want = [score_draws(_owned(p, tokenizer), [r])[0] for p, r in zip(paths, reqs, strict=True)]
    shared, models = _shared(paths, tokenizer)
    view = MixedView(shared, models)
    assert view.first_adapted_layer() == 1
    got = score_draws(view, reqs, adapters=models)
    for g, w in zip(got, want, strict=True):
        assert np.allclose(g, w, atol=ATOL)


def test_dtype_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from adapters import basemodel

    assert basemodel.resolve_dtype("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(basemodel, "cpu_has_bf16", lambda: False)
    assert basemodel.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(basemodel, "cpu_has_bf16", lambda: True)
    assert basemodel.resolve_dtype("auto", "cpu") == "bfloat16"
    assert basemodel.resolve_dtype("float16", "cpu") == "float16"
    with pytest.raises(ValueError, match="one of auto"):
        basemodel.resolve_dtype("fp8", "cpu")


def test_a_bf16_base_keeps_float32_factors_and_float32_choice_logits(three, tokenizer):
    enc = encode(MIXED[:2], tokenizer, PromptFormat())
    want = score_draws(_owned(three[0], tokenizer), [DrawRequest(enc, 4, 2)])[0]
    shared = SharedBase(make_tiny().to(torch.bfloat16), tokenizer)
    m = load_adapter(three[0], shared.base, tokenizer, shared=shared, lora_dtype=torch.float32)
    assert all(lay.lora_A.dtype == torch.float32 for lay in m.adapted.values())
    assert next(shared.base.parameters()).dtype == torch.bfloat16
    got = score_draws(m, [DrawRequest(enc, 4, 2)])[0]
    assert got.dtype == np.float64 and np.array_equal(np.isfinite(got), np.isfinite(want))  # -inf: no choice
    from adapters.uncertainty import softmax

    p = softmax
    assert np.abs(p(got) - p(want)).max() < 0.05  # bf16 rounding, not a different network


def test_a_slot_adds_a_block_of_rows_and_scattered_rows_alike(three, tokenizer):
    """score_draws groups rows by adapter so a slot adds a contiguous block through views; rows that are not
    contiguous take the gather/scatter path. Both give each row its adapter's output and leave the rest alone."""
    shared, models = _shared(three, tokenizer)
    name = next(iter(models[1].adapted))
    slot = shared.slots[name]
    x = torch.randn(6, 3, slot.base_layer.in_features)
    plain = slot.base_layer(x)
    with shared.routed([(models[1], None)]):
        full = slot(x)
    assert not torch.allclose(full, plain)
    for rows in (slice(1, 4), torch.tensor([0, 2, 5])):
        with shared.routed([(models[1], rows)]):
            got = slot(x)
        picked = torch.zeros(6, dtype=torch.bool)
        picked[rows] = True
        assert torch.allclose(got[picked], full[picked], atol=1e-6)
        assert torch.equal(got[~picked], plain[~picked])
