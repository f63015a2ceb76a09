import numpy as np
import pytest
import torch

from adapters.config import AdapterConfig, PromptFormat
from adapters.data import Item, load_jsonl
from adapters.model import DalorraModel
from adapters.scoring import choice_logits, letter_token_ids, score
from adapters.uncertainty import concat_items
from tests.conftest import randomize_lora

MIXED = [
    Item("Which is a mammal?", ("whale", "shark", "trout", "eel"), 0),
    Item("Is ice cold?", ("yes", "no"), 0),
    Item("Pick the prime number among these options", ("four", "six", "seven", "nine", "ten"), 2),
]


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_one_forward_equals_separate_forwards_tiny(tiny, tokenizer, mode):
    model = DalorraModel(tiny(), tokenizer, AdapterConfig(), PromptFormat(mode=mode), seed=0)
    randomize_lora(model, std=0.5)
    one = score(model, MIXED, samples=4, seed=7)
    sep = score(model, MIXED, samples=4, seed=7, batched=False)
    assert one.shape == (4, 3, 5)
    np.testing.assert_allclose(one, sep, atol=1e-4)
    assert np.isneginf(one[:, 1, 2:]).all() and np.isfinite(one[:, 2]).all()
    finite = np.isfinite(one[0])
    assert np.abs(one[0][finite] - one[1][finite]).max() > 1e-3  # the masks really differ


def test_cloze_cache_equals_full_sequences_tiny(tiny, tokenizer):
    model = DalorraModel(tiny(), tokenizer, AdapterConfig(), PromptFormat(mode="cloze", normalize="none"))
    randomize_lora(model, std=0.5)
    np.testing.assert_allclose(
        score(model, MIXED, samples=3, seed=1),
        score(model, MIXED, samples=3, seed=1, cloze_cache=False),
        atol=1e-4,
    )


def test_letter_tokens_take_leading_space_form(tokenizer):
    ids = letter_token_ids(tokenizer, PromptFormat(mode="letter"), 4)
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]


def test_same_answer_whatever_the_batch(tiny, tokenizer):
    model = DalorraModel(tiny(), tokenizer, AdapterConfig(), PromptFormat(mode="cloze"), seed=0)
    randomize_lora(model, std=0.5)
    alone = score(model, MIXED[:1], samples=3, seed=5)
    np.testing.assert_allclose(score(model, MIXED, samples=3, seed=5)[:, :1, :4], alone, atol=1e-4)


@pytest.mark.smollm
@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_real_smollm_batched_equals_separate(smollm, data_dir, mode):
    base, tok = smollm
    model = DalorraModel(base, tok, AdapterConfig(), PromptFormat(mode=mode), seed=0)
    randomize_lora(model, std=0.02)
    items = load_jsonl(data_dir / "arc_easy" / "validation.jsonl", limit=3)
    one = score(model, items, samples=3, seed=2)
    np.testing.assert_allclose(one, score(model, items, samples=3, seed=2, batched=False), atol=2e-4)
    if mode == "cloze":
        np.testing.assert_allclose(one, score(model, items, samples=3, seed=2, cloze_cache=False), atol=2e-4)


@pytest.mark.smollm
def test_real_smollm_zero_shot_cloze_above_chance(smollm, data_dir):
    base, tok = smollm
    model = DalorraModel(base, tok, AdapterConfig(), PromptFormat(mode="cloze"))
    model.set_mask_mode("off")
    items = load_jsonl(data_dir / "arc_easy" / "validation.jsonl", limit=48)
    with torch.no_grad():
        logits = concat_items([score(model, items[i : i + 16], samples=1) for i in range(0, 48, 16)])
    acc = (logits[0].argmax(-1) == np.array([it.label for it in items])).mean()
    assert acc > 0.33  # chance is 0.25; 46% measured on 200 items


def test_deterministic_and_ensemble_adapters_score_only_distinct_draws(tiny, tokenizer):
    """S draws of a deterministic adapter are one row; an M-member ensemble gives M equally weighted rows."""
    model = DalorraModel(tiny(), tokenizer, AdapterConfig(), PromptFormat(mode="cloze"), seed=0)
    randomize_lora(model, std=0.5)
    assert score(model, MIXED, samples=5, seed=0).shape[0] == 5  # DALorRA: every draw counts
    det = DalorraModel(
        tiny(), tokenizer, AdapterConfig(stochastic=False, method="lora"), PromptFormat(mode="cloze")
    )
    randomize_lora(det, std=0.5)
    assert score(det, MIXED, samples=5, seed=0).shape[0] == 1
    ens = DalorraModel(
        tiny(), tokenizer, AdapterConfig(stochastic=False, method="ensemble"), PromptFormat(mode="cloze")
    )
    randomize_lora(ens, std=0.5)
    for name, layer in ens.adapted.items():
        bank = torch.zeros(2, layer.r)
        bank[0, : layer.r // 2] = 1
        bank[1, layer.r // 2 :] = 1
        ens.fixed_masks[name] = bank
    full = score(ens, MIXED, samples=10, seed=0)
    assert full.shape[0] == 2
    np.testing.assert_allclose(full, score(ens, MIXED, samples=2, seed=0, batched=False), atol=1e-4)
    assert np.abs(full[0] - full[1])[np.isfinite(full[0])].max() > 1e-3  # the members really differ


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_top_layer_adapter_shares_lower_layers_with_same_result(tiny, tokenizer, mode):
    """Top-L path: layers below the first adapted one run once per item; results equal the plain path."""
    from adapters.scoring import encode, rows_for

    cfg = AdapterConfig(layers=(1,))  # the tiny model's top layer (plus lm_head)
    model = DalorraModel(tiny(), tokenizer, cfg, PromptFormat(mode=mode), seed=0)
    randomize_lora(model, std=0.5)
    assert model.first_adapted_layer() == 1
    assert DalorraModel(tiny(), tokenizer, AdapterConfig(), PromptFormat()).first_adapted_layer() == 0
    assert (
        DalorraModel(
            tiny(), tokenizer, AdapterConfig(targets=("lm_head",)), PromptFormat()
        ).first_adapted_layer()
        == 2
    )
    enc = encode(MIXED, tokenizer, model.fmt)
    masks = model.draw_masks(3, seed=4)
    items, samples = rows_for(len(MIXED), 3)
    with torch.no_grad():
        fast = choice_logits(model, enc, items, masks, samples)
        plain = choice_logits(model, enc, items, masks, samples, shared_lower=False)
    finite = torch.isfinite(plain)
    assert torch.equal(finite, torch.isfinite(fast))
    torch.testing.assert_close(fast[finite], plain[finite], atol=1e-4, rtol=0)
    assert (plain[finite].view(-1)[:4] != plain[finite].view(-1)[4:8]).any()
