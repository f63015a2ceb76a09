import copy

import pytest
import torch

from adapters.config import AdapterConfig, PromptFormat
from adapters.layer import MaskedLoraLinear
from adapters.model import DalorraModel
from tests.conftest import randomize_lora


def test_all_masks_on_equals_peft(tiny, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny()
    ref = copy.deepcopy(base)
    model = DalorraModel(base, tokenizer, AdapterConfig(), PromptFormat(), seed=0)
    randomize_lora(model)
    peft = get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]))
    with torch.no_grad():
        for name, layer in model.adapted.items():
            pl = peft.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
    ids = torch.randint(0, 49152, (3, 11))
    model.set_mask_mode("all")
    ours = model.base(input_ids=ids).logits
    theirs = peft(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    model.set_mask_mode("off")  # and LoRA off is the base model
    with peft.disable_adapter():
        torch.testing.assert_close(
            model.base(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_row_masks_select_per_row():
    torch.manual_seed(0)
    layer = MaskedLoraLinear(torch.nn.Linear(6, 5), r=4, alpha=8, p0=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 2, 6)
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1.0]])
    layer.mask_mode, layer.row_masks = "rows", masks
    y = layer(x)
    for i in range(3):
        expect = layer.base_layer(x[i]) + x[i] @ layer.merged_delta(masks[i]).T
        torch.testing.assert_close(y[i], expect, atol=1e-6, rtol=0)


def test_kl_matches_torch_distributions():
    from torch.distributions import Bernoulli, kl_divergence

    layer = MaskedLoraLinear(torch.nn.Linear(4, 4), r=6, alpha=8, p0=0.3).double()
    assert float(layer.kl().detach()) == pytest.approx(0.0, abs=1e-12)  # q = prior at initialisation
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([-3.0, -1, 0, 0.5, 2, 6], dtype=torch.float64))
    ref = kl_divergence(
        Bernoulli(probs=torch.sigmoid(layer.mask_logits)),
        Bernoulli(probs=torch.full((6,), 0.3, dtype=torch.float64)),
    ).sum()
    torch.testing.assert_close(layer.kl(), ref)


def test_kl_and_concrete_gradients_reach_phi():
    layer = MaskedLoraLinear(torch.nn.Linear(4, 3), r=5, alpha=8, p0=0.5, tau=2 / 3, hard=True)
    torch.nn.init.normal_(layer.lora_B)
    layer.mask_mode = "concrete"
    z = layer.concrete_mask(7)
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}  # hard forward
    (layer(torch.randn(7, 4)).pow(2).sum() + layer.kl()).backward()
    assert layer.mask_logits.grad is not None and layer.mask_logits.grad.abs().sum() > 0


def test_draw_masks_reproducible_and_follow_keep_prob(tiny, tokenizer):
    model = DalorraModel(tiny(), tokenizer, AdapterConfig(p0=0.5), PromptFormat())
    with torch.no_grad():
        for layer in model.adapted.values():
            layer.mask_logits.fill_(2.0)  # keep-probability 0.88
    a, b = model.draw_masks(400, seed=3), model.draw_masks(400, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head"], model.draw_masks(400, seed=4)["lm_head"])
    rate = torch.cat([m.flatten() for m in a.values()]).mean().item()
    assert rate == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=0.02)


@pytest.mark.parametrize(
    "bad", [dict(p0=0.0), dict(p0=1.0), dict(r=0), dict(tau=0), dict(method="bayes"), dict(targets=())]
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        AdapterConfig(**bad)


def test_mask_draws_are_prefix_consistent_and_seeded():
    from adapters.maskbank import draw_masks_from

    ranks = {"a": 8, "b": 4}
    keep = {"a": torch.full((8,), 0.5), "b": torch.full((4,), 0.3)}
    ten = draw_masks_from(ranks, keep, {}, 10, seed=3)
    four = draw_masks_from(ranks, keep, {}, 4, seed=3)
    rest = draw_masks_from(ranks, keep, {}, 6, seed=3, first=4)
    for n in ranks:
        torch.testing.assert_close(ten[n][:4], four[n])
        torch.testing.assert_close(ten[n][4:], rest[n])
    other = draw_masks_from(ranks, keep, {}, 10, seed=4)
    assert not torch.equal(ten["a"], other["a"])
    assert 0.3 < float(ten["a"].mean()) < 0.7  # Bernoulli(0.5), 80 draws
