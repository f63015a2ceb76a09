"""Method checks that fail for the right reason (issue 18, item 7).

* The KL gradient is tested away from φ = logit(p0), where it is exactly 0 and any scaling would pass.
* The trainer's loss is CE + KL/N on a hand case: with B = 0 the choice logits do not depend on the masks, so
  the logged NLL must equal a hand-computed cross-entropy of the base model and φ's gradient must equal the
  analytic ∂(KL/N)/∂φ (the CE part of it is exactly 0).
* MAP applies weight decay (AdamW's decoupled step, predicted exactly) and MC dropout is active at test time.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adapters import train as train_mod
from adapters.config import AdapterConfig, PromptFormat
from adapters.data import Item
from adapters.layer import MaskedLoraLinear
from adapters.model import DalorraModel
from adapters.scoring import score
from adapters.train import TrainConfig, train_one
from tests.conftest import make_tiny, randomize_lora


def _analytic_kl_grad(phi: torch.Tensor, p0: float) -> torch.Tensor:
    """∂KL(Bern(π) || Bern(p0))/∂φ_j = π(1−π)·(logit π − logit p0), with π = σ(φ) (so logit π = φ)."""
    pi = torch.sigmoid(phi)
    return pi * (1 - pi) * (phi - math.log(p0 / (1 - p0)))


@pytest.mark.parametrize("p0", [0.3, 0.5, 0.9])
def test_kl_gradient_equals_the_analytic_derivative_away_from_the_prior(p0):
    layer = MaskedLoraLinear(torch.nn.Linear(4, 4), r=6, alpha=8, p0=p0).double()
    phi = math.log(p0 / (1 - p0)) + torch.tensor([-3.0, -1.0, -0.25, 0.5, 2.0, 4.0], dtype=torch.float64)
    with torch.no_grad():
        layer.mask_logits.copy_(phi)
    layer.kl().backward()
    want = _analytic_kl_grad(phi, p0)
    torch.testing.assert_close(layer.mask_logits.grad, want, rtol=1e-10, atol=1e-12)
    assert bool((want.abs() > 1e-3).all())  # every φ_j is away from logit(p0): a zero gradient would fail


def test_model_kl_gradient_per_module(tokenizer):
    model = DalorraModel(make_tiny(), tokenizer, AdapterConfig(p0=0.2), PromptFormat(), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.adapted.values():
            layer.mask_logits.copy_(torch.randn(layer.r, generator=g) * 2)
    model.kl().backward()
    for name, layer in model.adapted.items():
        want = _analytic_kl_grad(layer.mask_logits.detach(), 0.2)
        torch.testing.assert_close(layer.mask_logits.grad, want, rtol=1e-5, atol=1e-7, msg=name)
        assert float(layer.mask_logits.grad.abs().min()) > 0


# ---- the trainer's loss on a hand case --------------------------------------------------------------
ROWS = [
    ("Is ice cold?", ["yes", "no"], 0),
    ("Is fire wet?", ["no", "yes", "maybe"], 0),
    ("Can fish swim?", ["yes", "no"], 0),
    ("Is the sky green?", ["yes", "no", "perhaps"], 1),
    ("Do birds fly?", ["never", "yes"], 1),
    ("Is salt sweet?", ["no", "yes"], 0),
]


@pytest.fixture(scope="module")
def hand_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("hand")
    rows = [{"id": str(i), "question": q, "choices": c, "label": y} for i, (q, c, y) in enumerate(ROWS)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


def _hand_cross_entropy(tiny_dir, tokenizer) -> float:
    """Mean CE of the base model's cloze choice scores, written out from the format's definition:
    score_k = mean over continuation tokens of log p(token | "Question: q\\nAnswer:" + earlier tokens)."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    total = 0.0
    for q, choices, y in ROWS:
        prompt = tokenizer(f"Question: {q}\nAnswer:").input_ids
        scores = []
        for c in choices:
            cont = tokenizer(" " + c, add_special_tokens=False).input_ids
            with torch.no_grad():
                lp = torch.log_softmax(base(input_ids=torch.tensor([prompt + cont])).logits[0].double(), -1)
            scores.append(sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont)) / len(cont))
        total += -float(torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)[y])
    return total / len(ROWS)


class _Recording(torch.optim.AdamW):
    """AdamW that keeps a copy of every gradient it is asked to apply."""

    seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        type(self).seen.append(
            [
                p.grad.detach().clone() if p.grad is not None else None
                for g in self.param_groups
                for p in g["params"]
            ]
        )
        return super().step(closure)


PHI_LOGITS = {}  # module name → the φ the hand case starts from


def _model_with_phi(*args, **kwargs):
    """The trainer's DalorraModel, then φ moved off logit(p0) (B stays 0, as at initialisation)."""
    model = DalorraModel(*args, **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for members in model.mask_groups.values():
            layer = model.adapted[members[0]]
            layer.mask_logits.copy_(torch.randn(layer.r, generator=g) * 1.5 + 0.4)
            assert float(layer.lora_B.abs().max()) == 0.0
    PHI_LOGITS.clear()
    PHI_LOGITS.update({n: lay.mask_logits.detach().clone() for n, lay in model.adapted.items()})
    return model


@pytest.mark.parametrize("train_samples", [1, 2])
def test_trainer_loss_is_ce_plus_kl_over_n(
    tmp_path, tiny_dir, hand_data, tokenizer, monkeypatch, train_samples
):
    monkeypatch.setattr(torch.optim, "AdamW", _Recording)
    monkeypatch.setattr(train_mod, "DalorraModel", _model_with_phi)
    _Recording.seen = []
    p0, N = 0.3, len(ROWS)
    cfg = TrainConfig(
        out=str(tmp_path / "ad"),
        train=str(hand_data),
        calibration=str(hand_data),
        base_model=str(tiny_dir),
        steps=1,
        batch_size=N,
        p0=p0,
        lr=1e-3,
        lr_mask=1e-2,
        train_samples=train_samples,
        progress=False,
        save_every=100,
    )
    model, summary = train_one(cfg, cfg.seed, tmp_path / "state.pt", resume=False)
    h = summary["history"][0]
    # CE: the whole set is one batch; masks cannot matter with B = 0, and M draws are averaged, not summed.
    assert h["nll"] == pytest.approx(_hand_cross_entropy(tiny_dir, tokenizer), rel=1e-5, abs=1e-6)
    # KL/N: logged at the starting φ, and it is the only gradient φ receives.
    kl_hand = sum(
        float(
            torch.distributions.kl_divergence(
                torch.distributions.Bernoulli(logits=PHI_LOGITS[m[0]].double()),
                torch.distributions.Bernoulli(probs=torch.full_like(PHI_LOGITS[m[0]].double(), p0)),
            ).sum()
        )
        for m in model.mask_groups.values()
    )
    assert kl_hand > 0.1
    assert h["kl_per_n"] == pytest.approx(kl_hand / N, rel=1e-5)
    grads = _Recording.seen[0]
    n_lora = 2 * len(model.adapted)
    phi_grads = grads[n_lora:]
    assert len(phi_grads) == len(model.mask_groups)
    for members, grad in zip(model.mask_groups.values(), phi_grads, strict=True):
        want = _analytic_kl_grad(PHI_LOGITS[members[0]].double(), p0) / N
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-9)
    # A's gradient passes through B = 0; B's gradient is the CE's alone (nonzero: the task moves it).
    assert all(float(g.abs().max()) == 0.0 for g in grads[0:n_lora:2])
    assert all(float(g.abs().max()) > 0.0 for g in grads[1:n_lora:2])


def test_train_samples_two_runs_and_trains(tmp_path, tiny_dir, hand_data):
    cfg = TrainConfig(
        out=str(tmp_path / "ad"),
        train=str(hand_data),
        calibration=str(hand_data),
        base_model=str(tiny_dir),
        steps=3,
        batch_size=3,
        lr=3e-3,
        train_samples=2,
        progress=False,
        save_every=100,
    )
    model, summary = train_one(cfg, cfg.seed, tmp_path / "state.pt", resume=False)
    assert len(summary["history"]) == 3
    assert all(math.isfinite(h["nll"]) and 0 < h["nll"] < 5 for h in summary["history"])
    assert any(float(lay.lora_B.detach().abs().max()) > 0 for lay in model.adapted.values())


# ---- MAP's weight decay and MC dropout's test-time dropout ---------------------------------------------
def _train(tmp_path, tiny_dir, data, method, steps, lr):
    cfg = TrainConfig(
        out=str(tmp_path / method / "ad"),
        train=str(data),
        calibration=str(data),
        base_model=str(tiny_dir),
        method=method,
        steps=steps,
        batch_size=6,
        lr=lr,
        warmup=0.0,
        progress=False,
        save_every=100,
    )
    model, _ = train_one(cfg, cfg.seed, tmp_path / method / "state.pt", resume=False)
    return cfg, model


def test_map_applies_weight_decay_exactly(tmp_path, tiny_dir, hand_data, tokenizer):
    """One step from identical starts: AdamW's decoupled decay makes MAP's A = LoRA's A − lr·wd·A₀ exactly."""
    lr = 0.05
    cfg, lora = _train(tmp_path, tiny_dir, hand_data, "lora", 1, lr)
    _, map_ = _train(tmp_path, tiny_dir, hand_data, "map", 1, lr)
    # A₀: the trainer seeds the DalorraModel with the run's seed, so the same construction rebuilds it.
    start = DalorraModel(
        make_tiny(seed=1), tokenizer, cfg.adapter_config(2), cfg.prompt_format(), seed=cfg.seed
    )
    wd = 0.01  # method=map's default when weight_decay is 0
    for name in lora.adapted:
        a0 = start.adapted[name].lora_A.detach()
        # With B₀ = 0, A gets no gradient at step 1: LoRA leaves A at A₀ and only the decay moves MAP's.
        torch.testing.assert_close(lora.adapted[name].lora_A.detach(), a0, rtol=0, atol=0)
        shift = a0 - map_.adapted[name].lora_A.detach()
        torch.testing.assert_close(shift, lr * wd * a0, rtol=1e-3, atol=1e-8)
        assert float(shift.abs().max()) > 1e-5  # far above the tolerance (float32 rounding of A₀ ~ 1e-8)
        # B: the same Adam step from B₀ = 0 (decay of 0 is 0) in both.
        torch.testing.assert_close(map_.adapted[name].lora_B, lora.adapted[name].lora_B, rtol=0, atol=0)
        assert float(lora.adapted[name].lora_B.detach().abs().max()) > 0


def test_map_changes_the_output_where_lora_repeats_itself(tmp_path, tiny_dir, hand_data):
    items = [Item(q, tuple(c), y) for q, c, y in ROWS]
    outs = {}
    for run, method in (("a", "lora"), ("b", "lora"), ("c", "map")):
        _, model = _train(tmp_path / run, tiny_dir, hand_data, method, 4, 0.05)
        outs[run] = score(model, items, samples=1, seed=0)
    np.testing.assert_array_equal(outs["a"], outs["b"])  # training is deterministic: equal runs, equal output
    assert _gap(outs["c"], outs["a"]) > 1e-4  # measured 7e-3


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference between two logit arrays, over real choices (a missing choice is −inf in both)."""
    assert np.array_equal(np.isfinite(a), np.isfinite(b))
    real = np.isfinite(a)
    return float(np.abs(a[real] - b[real]).max())


def _dropout_pair(tokenizer):
    """Two adapters with the same weights and the same LoRA dropout 0.1, one trained as LoRA, one as MC dropout."""
    models = {}
    for method in ("lora", "mcdropout"):
        cfg = AdapterConfig(method=method, dropout=0.1, stochastic=False)
        models[method] = DalorraModel(make_tiny(), tokenizer, cfg, PromptFormat(), seed=0).eval()
        randomize_lora(models[method], seed=3, std=0.5)
    return models


def test_mc_dropout_is_active_at_test_time_and_seeded(tokenizer):
    models = _dropout_pair(tokenizer)
    items = [Item(q, tuple(c), y) for q, c, y in ROWS[:3]]
    mc = models["mcdropout"]
    a, b, c = score(mc, items, 3, seed=1), score(mc, items, 3, seed=1), score(mc, items, 3, seed=2)
    np.testing.assert_array_equal(a, b)  # reproducible by seed
    assert a.shape == (3, 3, 3)  # MC dropout is never clipped to one draw
    assert _gap(a, c) > 1e-4  # another seed, other dropout masks
    assert _gap(a[0], a[1]) > 1e-4  # and the S draws of one call differ
    assert all(not lay.dropout.training and lay.row_noise is None for lay in mc.adapted.values())  # off again
    lora = models["lora"]
    x, y = score(lora, items, 3, seed=1), score(lora, items, 3, seed=2)
    assert x.shape == (1, 3, 3)  # deterministic: one draw
    np.testing.assert_array_equal(x, y)
    assert min(_gap(a[s], x[0]) for s in range(3)) > 1e-4  # every MC draw differs from LoRA: dropout is on
    with torch.no_grad():  # and LoRA equals the MC model with its dropout off: dropout is the only difference
        mc.set_mask_mode("all")
        lora.set_mask_mode("all")
        ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(
            mc.base(input_ids=ids).logits, lora.base(input_ids=ids).logits, rtol=0, atol=0
        )


def test_mcdropout_trains_with_dropout_and_lora_without():
    assert TrainConfig(out="x", method="mcdropout").adapter_config(2).dropout == 0.1
    assert TrainConfig(out="x", method="lora").adapter_config(2).dropout == 0.0
