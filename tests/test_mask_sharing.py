"""Mask sharing (AdapterConfig.mask_sharing): which modules share one φ and one draw z_j per rank index.

The tiny model's adapted modules: lm_head and the q_proj, v_proj of decoder layers 0 and 1.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Bernoulli, kl_divergence

from adapters.adapter_io import load_adapter, save_adapter
from adapters.config import AdapterConfig, PromptFormat
from adapters.data import Item
from adapters.maskbank import BankSource
from adapters.model import DalorraModel
from adapters.scoring import score
from adapters.train import TrainConfig, train_one
from tests.conftest import make_tiny, randomize_lora
from tests.test_maskbank import expected_draws

Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
V0, V1 = "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"
HEAD = "lm_head"
ALL = [HEAD, Q0, V0, Q1, V1]
GROUPS = {
    "module": [[HEAD], [Q0], [V0], [Q1], [V1]],
    "rank": [[HEAD], [Q0, Q1], [V0, V1]],
    "layer": [[HEAD], [Q0, V0], [Q1, V1]],
}


def _model(tokenizer, sharing: str) -> DalorraModel:
    """A tiny DALorRA model with non-zero B and a different φ per switch group (keep-probabilities 0.1 … 0.9)."""
    model = DalorraModel(make_tiny(), tokenizer, AdapterConfig(mask_sharing=sharing), PromptFormat(), seed=0)
    randomize_lora(model, seed=1, std=0.3)
    with torch.no_grad():
        for i, phi in enumerate(model.mask_parameters()):
            phi.copy_(torch.linspace(-2.2, 2.2, phi.numel()).roll(3 * i))
    return model


def _kl(phi: torch.Tensor, p0: float = 0.5) -> torch.Tensor:
    return kl_divergence(
        Bernoulli(logits=phi.double()), Bernoulli(probs=torch.full_like(phi.double(), p0))
    ).sum()


@pytest.mark.parametrize("sharing", ["module", "rank", "layer"])
def test_one_phi_parameter_per_group(tokenizer, sharing):
    model = _model(tokenizer, sharing)
    assert sorted(model.mask_groups.values()) == sorted(GROUPS[sharing])
    params = list(model.mask_parameters())
    assert len(params) == len(GROUPS[sharing]) == len({id(p) for p in params})  # a shared φ is yielded once
    for group in GROUPS[sharing]:
        first = model.adapted[group[0]].mask_logits
        assert all(model.adapted[n].mask_logits is first for n in group)  # the same tensor, not a copy
        assert sum(p is first for p in params) == 1
    for a, b in ((Q0, Q1), (Q0, V0), (HEAD, Q0)):  # modules of different groups stay apart
        if not any(a in g and b in g for g in GROUPS[sharing]):
            assert model.adapted[a].mask_logits is not model.adapted[b].mask_logits
    torch.optim.AdamW([{"params": params}])  # an optimiser accepts them (a parameter listed twice raises)


@pytest.mark.parametrize("sharing", ["module", "rank", "layer"])
def test_kl_counts_a_shared_phi_once(tokenizer, sharing):
    model = _model(tokenizer, sharing)
    kl = model.kl()
    per_group = sum(float(_kl(model.adapted[g[0]].mask_logits.detach())) for g in GROUPS[sharing])
    per_module = sum(float(_kl(model.adapted[n].mask_logits.detach())) for n in ALL)
    assert float(kl.detach()) == pytest.approx(per_group, rel=1e-5)
    if sharing != "module":
        assert per_module > per_group * 1.3  # counting each member would be visibly larger
    kl.backward()
    for g in GROUPS[sharing]:  # ∂KL/∂φ of a shared φ is that of one KL term, not one per member
        phi = model.adapted[g[0]].mask_logits
        pi = torch.sigmoid(phi.detach())
        torch.testing.assert_close(phi.grad, pi * (1 - pi) * phi.detach(), rtol=1e-5, atol=1e-7)  # p0 = 0.5


@pytest.mark.parametrize("sharing", ["rank", "layer"])
def test_shared_modules_draw_identical_masks(tokenizer, sharing):
    model = _model(tokenizer, sharing)
    n = 400
    masks = model.draw_masks(n, seed=3)
    for g in GROUPS[sharing]:
        for other in g[1:]:
            assert torch.equal(masks[other], masks[g[0]])
        p = model.adapted[g[0]].keep_prob.detach().double()
        rate = masks[g[0]].double().mean(0)
        assert bool(((rate - p).abs() <= 4.5 * torch.sqrt(p * (1 - p) / n)).all())  # still Bernoulli(σ(φ))
    heads = [g[0] for g in GROUPS[sharing]]
    assert not any(torch.equal(masks[a], masks[b]) for a in heads for b in heads if a < b)  # groups differ
    # Training draws are shared the same way (one relaxed draw per group and row).
    z = model.concrete_masks(6)
    for g in GROUPS[sharing]:
        assert all(torch.equal(z[m], z[g[0]]) for m in g)


def test_group_draws_follow_the_documented_order(tokenizer):
    """Sample s's generator serves the groups one after another: for rank, kind:lm_head, kind:q_proj, kind:v_proj."""
    model = _model(tokenizer, "rank")
    keep = {k: model.adapted[g[0]].keep_prob.detach() for k, g in model.mask_groups.items()}
    want = expected_draws(keep, 5, seed=8)
    got = model.draw_masks(5, seed=8)
    for key, members in model.mask_groups.items():
        for n in members:
            torch.testing.assert_close(got[n], want[key], rtol=0, atol=0)


def test_module_sharing_reproduces_independent_per_module_draws(tokenizer):
    """ "module" is the paper and the old behaviour: every module draws alone, in sorted-name order."""
    model = _model(tokenizer, "module")
    keep = {n: lay.keep_prob.detach() for n, lay in model.adapted.items()}
    for seed, first in ((0, 0), (17, 0), (17, 6)):
        got = model.draw_masks(6, seed, first=first)
        want = expected_draws(keep, 6, seed, first=first)
        for n in ALL:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    assert AdapterConfig().mask_sharing == "module"  # the default


@pytest.mark.parametrize("sharing", ["rank", "layer"])
def test_shared_adapter_round_trips_and_the_bank_draws_the_same(tokenizer, tmp_path, sharing):
    model = _model(tokenizer, sharing)
    out = save_adapter(model, tmp_path / "ad")
    assert json.loads((out / "dalorra.json").read_text())["adapter"]["mask_sharing"] == sharing
    loaded = load_adapter(out, make_tiny(), tokenizer)
    assert loaded.cfg.mask_sharing == sharing
    for g in GROUPS[sharing]:  # tied again after loading, with the trained values
        assert all(loaded.adapted[n].mask_logits is loaded.adapted[g[0]].mask_logits for n in g)
        torch.testing.assert_close(
            loaded.adapted[g[0]].mask_logits, model.adapted[g[0]].mask_logits, rtol=0, atol=0
        )
    assert len(list(loaded.mask_parameters())) == len(GROUPS[sharing])
    for n in ALL:
        torch.testing.assert_close(loaded.adapted[n].lora_A, model.adapted[n].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(loaded.adapted[n].lora_B, model.adapted[n].lora_B, rtol=0, atol=0)
    want = model.draw_masks(6, seed=5)
    src = BankSource(out)
    assert src.sharing == sharing
    for got in (loaded.draw_masks(6, seed=5), src.draw(6, seed=5)):
        for n in ALL:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    item = [Item("Is water wet?", ("yes", "no", "maybe"))]
    torch.testing.assert_close(
        torch.from_numpy(score(loaded, item, 4, seed=2)),
        torch.from_numpy(score(model, item, 4, seed=2)),
        rtol=0,
        atol=1e-6,
    )


def test_shared_adapter_with_disagreeing_copies_is_refused(tokenizer, tmp_path):
    """A hand-edited shared adapter whose saved φ copies differ would draw differently on the HF path (last copy)
    and in the mask bank (first copy): it is refused instead."""
    from safetensors.torch import load_file, save_file

    from adapters.adapter_io import AdapterError

    out = save_adapter(_model(tokenizer, "rank"), tmp_path / "ad")
    masks = load_file(str(out / "dalorra_masks.safetensors"))
    key = next(k for k in sorted(masks) if k.endswith("q_proj.mask_logits"))
    masks[key] = masks[key] + 1.0
    save_file(masks, str(out / "dalorra_masks.safetensors"))
    with pytest.raises(AdapterError, match="share one switch"):
        load_adapter(out, make_tiny(), tokenizer)


def test_training_keeps_a_shared_phi_tied(tmp_path, tiny_dir):
    rows = [{"question": f"Is {i} a number?", "choices": ["no", "yes"], "label": 1} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(
        out=str(tmp_path / "ad"),
        train=str(data),
        calibration=str(data),
        base_model=str(tiny_dir),
        mask_sharing="layer",
        steps=3,
        batch_size=4,
        lr=3e-3,
        lr_mask=0.1,
        train_samples=2,
        progress=False,
        save_every=100,
    )
    model, _ = train_one(cfg, cfg.seed, tmp_path / "state.pt", resume=False)
    assert model.cfg.mask_sharing == "layer"
    assert model.adapted[Q0].mask_logits is model.adapted[V0].mask_logits
    assert float(model.adapted[Q0].mask_logits.detach().abs().max()) > 0  # moved off logit(0.5) = 0
    assert not torch.equal(model.adapted[Q0].mask_logits, model.adapted[Q1].mask_logits)
    save_adapter(model, tmp_path / "ad")
    phi = load_file(str(tmp_path / "ad" / "dalorra_masks.safetensors"))
    assert torch.equal(phi[f"{Q0}.mask_logits"], phi[f"{V0}.mask_logits"])
