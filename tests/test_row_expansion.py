"""Row expansion in one place (issue 18, item 2): adapters.scoring.score_draws draws the masks, lays out the rows,
clips them to the distinct draws and seeds MC dropout per row, for offline `score` and the HF backend alike.

MC dropout's noise is a function of (seed, draw, token position) only, so it must not move with the batch, the
padding, adaptive rounds or the scoring path, while still being dropout at the configured rate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.config import AdapterConfig, PromptFormat
from adapters.layer import MaskedLoraLinear
from adapters.model import DalorraModel
from adapters.scoring import DrawRequest, encode, score, score_draws
from tests.conftest import make_tiny, randomize_lora
from tests.test_scoring import MIXED

ATOL = 1e-5  # float32 forwards of different batch shapes agree to ~1e-6


def _mc(tokenizer, mode="cloze", **cfg):
    cfg = AdapterConfig(method="mcdropout", dropout=0.1, stochastic=False, **cfg)
    model = DalorraModel(make_tiny(), tokenizer, cfg, PromptFormat(mode=mode), seed=0).eval()
    randomize_lora(model, seed=3, std=0.5)
    return model


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    real = np.isfinite(a)
    assert np.array_equal(real, np.isfinite(b))
    return float(np.abs(a[real] - b[real]).max())


# ---- the dropout itself -----------------------------------------------------------------------------------
def _layer(p: float, d_in: int = 512) -> MaskedLoraLinear:
    return MaskedLoraLinear(torch.nn.Linear(d_in, 4), r=2, alpha=2, p0=0.5, dropout=p).eval()


def test_seeded_dropout_drops_at_the_configured_rate_per_token():
    p = 0.25
    layer = _layer(p)
    x = torch.ones(6, 16, 512)
    layer.row_noise = (torch.arange(6) * 7, torch.arange(16).expand(6, 16))
    y = layer._dropout(x)
    dropped = float((y == 0).double().mean())
    assert abs(dropped - p) < 0.01  # 49k draws: σ ≈ 0.002
    assert torch.allclose(
        y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p))
    )  # kept inputs scaled as nn.Dropout
    assert not torch.equal(y[0, 0] == 0, y[0, 1] == 0)  # a new mask per token, not one per row
    assert not torch.equal(y[0, 0] == 0, y[1, 0] == 0)  # and per stream
    layer.row_noise = None
    assert torch.equal(layer._dropout(x), x)  # eval mode without streams: no dropout


def test_a_tokens_noise_depends_on_its_stream_and_position_only():
    layer = _layer(0.5, d_in=64)
    x = torch.randn(3, 10, 64)
    layer.row_noise = (torch.tensor([11, 22, 33]), torch.arange(10).expand(3, 10))
    full = layer._dropout(x)
    # Stream 22 alone, left-padded by 4 (positions 0 there) and beside another stream of another length.
    pad = torch.cat([torch.zeros(1, 4, 64), x[1:2, :6]], 1)
    layer.row_noise = (
        torch.tensor([22, 44]),
        torch.stack([torch.cat([torch.zeros(4), torch.arange(6)]), torch.arange(10)]).long(),
    )
    alone = layer._dropout(torch.cat([pad, torch.randn(1, 10, 64)]))
    torch.testing.assert_close(alone[0, 4:], full[1, :6], rtol=0, atol=0)
    other = _layer(0.5, d_in=64)
    other.noise_id = 1  # another module: other noise from the same stream
    other.row_noise = (torch.tensor([11, 22, 33]), torch.arange(10).expand(3, 10))
    assert not torch.equal(other._dropout(x) == 0, full == 0)


# ---- one request, whatever shares its forward -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_mc_dropout_is_the_same_alone_batched_and_in_separate_forwards(tokenizer, mode):
    model = _mc(tokenizer, mode)
    both = score(model, MIXED, samples=3, seed=4)
    assert both.shape == (3, 3, 5)
    np.testing.assert_allclose(score(model, MIXED, samples=3, seed=4, batched=False), both, atol=ATOL)
    np.testing.assert_allclose(score(model, MIXED[:1], samples=3, seed=4), both[:, :1, :4], atol=ATOL)
    assert _gap(both[0], both[1]) > 1e-3  # the draws differ: the equalities above test the noise
    assert _gap(both, score(model, MIXED, samples=3, seed=5)) > 1e-3


def test_mc_dropout_noise_is_the_same_on_every_scoring_path(tokenizer):
    """Cached cloze, full sequences and the shared-lower-layers path lay tokens out differently; the noise of a
    token follows (draw, choice, position), so all three agree."""
    model = _mc(tokenizer)
    cached = score(model, MIXED, samples=2, seed=1)
    np.testing.assert_allclose(score(model, MIXED, samples=2, seed=1, cloze_cache=False), cached, atol=ATOL)
    top = _mc(tokenizer, layers=(1,))
    assert top.first_adapted_layer() == 1
    shared = score(top, MIXED, samples=2, seed=1)  # layer 0 once per item, layer 1 per row
    top.first_adapted_layer = lambda: 0  # the plain path: every layer per row
    np.testing.assert_allclose(score(top, MIXED, samples=2, seed=1), shared, atol=ATOL)


def test_requests_in_one_forward_equal_each_alone(tokenizer):
    model = _mc(tokenizer)
    enc = encode(MIXED, tokenizer, model.fmt)
    reqs = [
        DrawRequest(enc[:1], 3, seed=7),
        DrawRequest(enc[1:], 2, seed=8),
        DrawRequest(enc[:1], 2, seed=9, first=3),
    ]
    together = score_draws(model, reqs)
    for r, got in zip(reqs, together, strict=True):
        alone = score_draws(model, [r])[0]
        assert got.shape == alone.shape == (r.samples, len(r.enc), max(e.k for e in r.enc))
        np.testing.assert_allclose(got, alone, atol=ATOL)


def test_adaptive_rounds_continue_the_same_draws(tokenizer):
    model = _mc(tokenizer)
    enc = encode(MIXED[:2], tokenizer, model.fmt)
    whole = score_draws(model, [DrawRequest(enc, 7, seed=2)])[0]
    rounds = score_draws(model, [DrawRequest(enc, 4, seed=2), DrawRequest(enc, 3, seed=2, first=4)])
    np.testing.assert_allclose(np.concatenate(rounds), whole, atol=ATOL)


# ---- clipping to distinct draws ---------------------------------------------------------------------------
def _rows_seen(model):
    seen: list[int] = []
    model.decoder.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return seen


@pytest.mark.parametrize("samples", [1, 4, 16])
def test_a_deterministic_adapter_scores_one_row_whatever_s(tokenizer, samples):
    model = DalorraModel(
        make_tiny(),
        tokenizer,
        AdapterConfig(method="lora", stochastic=False),
        PromptFormat(mode="letter"),
        seed=0,
    )
    randomize_lora(model, std=0.5)
    seen = _rows_seen(model)
    enc = encode(MIXED[:1], tokenizer, model.fmt)
    out = score_draws(model, [DrawRequest(enc, samples, seed=samples)])[0]
    assert out.shape == (1, 1, 4) and seen == [1]  # one row went through the model
    later = score_draws(model, [DrawRequest(enc, samples, seed=0, first=1)])[0]
    assert later.shape == (0, 1, 4) and seen == [1]  # an adaptive round past it: no forward at all
    np.testing.assert_array_equal(out, score(model, MIXED[:1], samples=1, seed=0))


def test_an_ensemble_scores_each_member_once(tokenizer):
    model = DalorraModel(
        make_tiny(),
        tokenizer,
        AdapterConfig(method="ensemble", stochastic=False, r=4),
        PromptFormat(mode="letter"),
        seed=0,
    )
    randomize_lora(model, std=0.5)
    for name in model.adapted:
        model.fixed_masks[name] = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    enc = encode(MIXED[:1], tokenizer, model.fmt)
    assert score_draws(model, [DrawRequest(enc, 10, seed=0)])[0].shape[0] == 3
    late = score_draws(model, [DrawRequest(enc, 10, seed=0, first=2)])[0]
    assert late.shape[0] == 1  # members 2 only: 0 and 1 were scored by the first round
    np.testing.assert_allclose(late[0], score(model, MIXED[:1], samples=3)[2], atol=ATOL)
