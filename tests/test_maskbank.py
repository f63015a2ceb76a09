"""The mask draw and the mask bank against independent expectations (no vLLM needed).

tests/vllm_backend compares DalorraModel.draw_masks with draw_masks_from, which is the same function; here the
draws are checked against what they must be: Bernoulli(σ(φ)) keep-rates, the documented (seed, s) generator,
prefix consistency, ensemble members cycling s mod M, and bank members that are A with masked rows zeroed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from adapters.adapter_io import load_adapter, save_adapter
from adapters.config import AdapterConfig, PromptFormat
from adapters.maskbank import BankSource
from adapters.masks import draw_masks_from
from adapters.model import DalorraModel
from tests.conftest import make_tiny, randomize_lora


def expected_draws(keep: dict[str, torch.Tensor], samples: int, seed: int, first: int = 0) -> dict:
    """Sample s comes from its own generator seeded (seed · 1_000_003 + s) mod 2^63; within it every module,
    in sorted-name order, takes r uniforms, and z_j = 1[u_j < σ(φ_j)]."""
    out = {n: torch.zeros(samples, len(k)) for n, k in keep.items()}
    for row, s in enumerate(range(first, first + samples)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + s) % (2**63))
        for n in sorted(keep):
            out[n][row] = (torch.rand(len(keep[n]), generator=g) < keep[n]).float()
    return out


FACTORS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module → the trained (A, B) of dalorra_dir


@pytest.fixture(scope="module")
def dalorra_dir(tmp_path_factory, tokenizer):
    """A DALorRA adapter on the tiny model whose keep-probabilities span 0.08 … 0.92 in every module."""
    model = DalorraModel(make_tiny(), tokenizer, AdapterConfig(), PromptFormat(), seed=0)
    randomize_lora(model, seed=1, std=0.3)
    with torch.no_grad():
        for i, layer in enumerate(model.adapted.values()):
            layer.mask_logits.copy_(torch.linspace(-2.5, 2.5, layer.r).roll(i))
    FACTORS.update(
        {n: (lay.lora_A.detach().clone(), lay.lora_B.detach().clone()) for n, lay in model.adapted.items()}
    )
    return save_adapter(model, tmp_path_factory.mktemp("bank") / "ad")


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, tokenizer):
    """A 3-member ensemble (rank 3·2): member m keeps components 2m, 2m+1."""
    cfg = AdapterConfig(method="ensemble", r=6, alpha=48.0, stochastic=False)
    model = DalorraModel(make_tiny(), tokenizer, cfg, PromptFormat(), seed=0)
    randomize_lora(model, seed=2, std=0.3)
    blocks = torch.zeros(3, 6)
    for m in range(3):
        blocks[m, 2 * m : 2 * m + 2] = 1.0
    for name in model.adapted:
        model.fixed_masks[name] = blocks.clone()
    return save_adapter(model, tmp_path_factory.mktemp("bank") / "ens")


def test_bank_draws_equal_the_documented_generator(dalorra_dir):
    src = BankSource(dalorra_dir)
    keep = {n: torch.sigmoid(v) for n, v in _phi(dalorra_dir).items()}
    assert src.stochastic and src.sharing == "module" and src.distinct() is None
    for seed in (0, 5, 123456789):
        got, want = src.draw(6, seed), expected_draws(keep, 6, seed)
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_keep_rate_matches_sigmoid_phi_within_binomial_error(dalorra_dir):
    n_draws = 2000
    masks = BankSource(dalorra_dir).draw(n_draws, seed=11)
    for name, phi in _phi(dalorra_dir).items():
        p = torch.sigmoid(phi).double()
        rate = masks[name].double().mean(0)  # (r,) empirical keep rate per rank component
        bound = 4.5 * torch.sqrt(p * (1 - p) / n_draws)  # 4.5 σ: a false alarm ~1e-5 per component
        assert bool(((rate - p).abs() <= bound).all()), (name, rate, p)
    # Components are drawn independently: the rate of "both kept" matches the product of the marginals.
    m = masks["lm_head"].double()
    both, prod = float((m[:, 0] * m[:, 1]).mean()), float(m[:, 0].mean() * m[:, 1].mean())
    assert abs(both - prod) <= 4.5 * math.sqrt(prod * (1 - prod) / n_draws)


def test_draws_are_prefix_consistent_and_depend_on_the_seed(dalorra_dir):
    src = BankSource(dalorra_dir)
    ten, four = src.draw(10, seed=3), src.draw(4, seed=3)
    rest = draw_masks_from(src.ranks, src.keep, src.fixed, 6, seed=3, first=4, sharing=src.sharing)
    other = src.draw(10, seed=4)
    for n in ten:
        torch.testing.assert_close(ten[n][:4], four[n], rtol=0, atol=0)
        torch.testing.assert_close(ten[n][4:], rest[n], rtol=0, atol=0)
    assert any(not torch.equal(ten[n], other[n]) for n in ten)


def test_model_draws_equal_the_bank_draws(dalorra_dir, tokenizer):
    model = load_adapter(dalorra_dir, make_tiny(), tokenizer)
    src = BankSource(dalorra_dir)
    got, want = model.draw_masks(8, seed=2), src.draw(8, seed=2)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_ensemble_members_cycle_s_mod_m(ensemble_dir):
    src = BankSource(ensemble_dir)
    assert not src.stochastic and src.keep is None and src.distinct() == 3
    fixed = load_file(str(ensemble_dir / "dalorra_masks.safetensors"))
    masks = src.draw(7, seed=9)
    late = draw_masks_from(src.ranks, src.keep, src.fixed, 4, seed=9, first=5)
    for name in src.ranks:
        blocks = fixed[f"{name}.fixed_masks"]
        for s in range(7):
            assert torch.equal(masks[name][s], blocks[s % 3])
        for i in range(4):
            assert torch.equal(late[name][i], blocks[(5 + i) % 3])
    assert torch.equal(
        src.draw(7, seed=9)["lm_head"], src.draw(7, seed=0)["lm_head"]
    )  # the seed is irrelevant


def test_bank_member_is_a_with_masked_rows_zeroed(dalorra_dir, tmp_path):
    """Member i = the trained factors with row j of A zeroed where z_ij = 0 and B as trained (not the mean
    network B·diag(σ(φ)) that adapter_model.safetensors holds for PEFT), under the adapter's PEFT config."""
    src = BankSource(dalorra_dir)
    masks = src.draw(4, seed=1)
    assert 0.2 < float(torch.cat([m.flatten() for m in masks.values()]).mean()) < 0.8  # rows kept and dropped
    for i in range(4):
        out = src.write_member(masks, i, tmp_path / f"m{i}")
        member = load_file(str(out / "adapter_model.safetensors"))
        assert len(member) == 2 * len(FACTORS)
        assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
            (dalorra_dir / "adapter_config.json").read_text()
        )
        for name, (A, B) in FACTORS.items():
            a_i = member[f"base_model.model.{name}.lora_A.weight"]
            assert torch.equal(member[f"base_model.model.{name}.lora_B.weight"], B)
            z = masks[name][i]
            for j in range(len(z)):
                want = A[j] if z[j] == 1 else torch.zeros_like(A[j])
                assert torch.equal(a_i[j], want), (name, j)


def test_bank_member_as_peft_equals_the_masked_dalorra_model(dalorra_dir, tokenizer, tmp_path):
    """The whole point of the bank: a plain PEFT LoRA (member i) gives what DALorRA gives under mask z_i."""
    from peft import PeftModel

    src = BankSource(dalorra_dir)
    masks = src.draw(2, seed=4)
    model = load_adapter(dalorra_dir, make_tiny(), tokenizer)
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(0))
    for i in range(2):
        peft = PeftModel.from_pretrained(
            make_tiny(), str(src.write_member(masks, i, tmp_path / f"m{i}"))
        ).eval()
        with torch.no_grad(), model.row_masks(masks, torch.tensor([i, i])):
            ours = model.base(input_ids=ids).logits
        with torch.no_grad():
            theirs = peft(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    with torch.no_grad(), model.row_masks(masks, torch.tensor([0, 0])):
        z0 = model.base(input_ids=ids).logits
    with torch.no_grad(), model.row_masks(masks, torch.tensor([1, 1])):
        z1 = model.base(input_ids=ids).logits
    assert float((z0 - z1).abs().max()) > 1e-4  # the members differ, so the equality above tests the masks


def _phi(adapter_dir) -> dict[str, torch.Tensor]:
    masks = load_file(str(adapter_dir / "dalorra_masks.safetensors"))
    return {k.removesuffix(".mask_logits"): v for k, v in masks.items() if k.endswith(".mask_logits")}
