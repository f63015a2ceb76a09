"""Generated answers: mean-mask decoding, the one-forward S-mask scoring pass, and the uncertainty summary."""

import threading

import numpy as np
import pytest
import torch

from adapters.config import AdapterConfig, PromptFormat
from adapters.generate import PromptTooLong, generate, mean_masks, score_answers, vocab_uncertainty
from adapters.generation import GenerateRequest, TokenScores, decide, summarize_answer, thresholds_of
from adapters.model import DalorraModel
from adapters.uncertainty import summarize
from tests.conftest import randomize_lora

PROMPT = "Question: Which gas do plants take in from the air?\nAnswer:"


@pytest.fixture
def model(tiny, tokenizer):
    m = DalorraModel(tiny(), tokenizer, AdapterConfig(), PromptFormat(mode="cloze"), seed=0)
    randomize_lora(m, std=0.5)
    return m.eval()


def _gen(model, **kw):
    req = GenerateRequest(
        adapter="a", prompt=PROMPT, **{"max_tokens": 8, "temperature": 0.0, "samples": 4, **kw}
    )
    return generate(model, req, threading.Lock(), 512)


def test_greedy_decoding_is_the_mean_mask_network(model):
    """Decoding equals transformers' own greedy generate with every switch at σ(φ) (the layers' "mean" mode)."""
    res = _gen(model, max_tokens=10, samples=0)
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    model.set_mask_mode("mean")
    ref = model.base.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)[
        0, ids.shape[1] :
    ].tolist()
    model.set_mask_mode("all")
    got = res.choices[0].token_ids
    assert got == ref[: len(got)] and len(got) >= 1
    assert res.prompt_tokens == ids.shape[1] and res.choices[0].scores is None


def test_mean_masks_per_method(model, tiny, tokenizer):
    mm = mean_masks(model)
    for name, lay in model.adapted.items():
        torch.testing.assert_close(mm[name][0], lay.keep_prob)
    lora = DalorraModel(tiny(), tokenizer, AdapterConfig(method="lora", stochastic=False), seed=0)
    assert mean_masks(lora) is None  # all switches on: plain LoRA


def test_one_forward_scoring_equals_separate_mask_forwards(model):
    prompt = model.tokenizer(PROMPT).input_ids
    answers = [[510, 2330, 28], [711], []]
    got, S = score_answers(model, prompt, answers, samples=5, seed=3)
    assert S == 5 and got[2].entropy.shape == (0,)
    masks = model.draw_masks(5, 3)
    for ans, sc in zip(answers[:2], got[:2], strict=True):
        per = []
        for s in range(5):  # reference: one plain forward per mask
            ids = torch.tensor([prompt + ans])
            with torch.no_grad(), model.row_masks({n: m[s : s + 1] for n, m in masks.items()}):
                logits = model.base(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ans)]
            per.append(torch.log_softmax(logits.double(), -1).numpy())
        lp = np.stack(per)  # (S, T, V)
        ref = summarize(lp)  # the K-choice math of /predict, with the vocabulary as the K "choices"
        np.testing.assert_allclose(sc.entropy, ref["entropy"], atol=1e-4)
        np.testing.assert_allclose(sc.aleatoric, ref["aleatoric"], atol=1e-4)
        np.testing.assert_allclose(sc.epistemic, ref["epistemic"], atol=1e-4)
        np.testing.assert_allclose(sc.mask_logprobs, lp[:, np.arange(len(ans)), ans], atol=1e-4)
        pbar = np.exp(lp).mean(0)
        np.testing.assert_allclose(sc.mean_logprobs, np.log(pbar[np.arange(len(ans)), ans]), atol=1e-4)
        assert (sc.epistemic >= 0).all() and (sc.epistemic <= sc.entropy + 1e-9).all()
        assert sc.epistemic.max() > 1e-4  # the masks really differ


def test_vocab_uncertainty_properties():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 3, 50, generator=g, dtype=torch.float64), -1)
    y = torch.tensor([1, 7, 49])
    one = vocab_uncertainty(lp[:1], y)
    assert torch.all(one["epistemic"] == 0)  # S = 1: no mutual information
    a = vocab_uncertainty(lp, y)
    b = vocab_uncertainty(lp[torch.randperm(6, generator=g)], y)  # sample order does not matter
    for k in ("entropy", "aleatoric", "epistemic", "mean_logprobs"):
        torch.testing.assert_close(a[k], b[k])
    # hand case: two masks, certain of different tokens → H[p̄] = log 2, aleatoric 0, MI = log 2
    two = torch.log(torch.tensor([[[1.0, 1e-300]], [[1e-300, 1.0]]], dtype=torch.float64))
    h = vocab_uncertainty(two, torch.tensor([0]))
    assert float(h["epistemic"][0]) == pytest.approx(np.log(2), abs=1e-9)
    assert float(h["mean_logprobs"][0]) == pytest.approx(np.log(0.5), abs=1e-9)


def test_deterministic_adapter_scores_once_with_zero_epistemic(tiny, tokenizer):
    lora = DalorraModel(tiny(), tokenizer, AdapterConfig(method="lora", stochastic=False), seed=0)
    res = _gen(lora, samples=10)
    assert res.samples == 1
    assert np.all(res.choices[0].scores.epistemic == 0)


def test_summary_and_decision_by_hand():
    sc = TokenScores(
        entropy=np.array([1.0, 3.0]),
        aleatoric=np.array([0.9, 2.0]),
        epistemic=np.array([0.1, 1.0]),
        mask_logprobs=np.log(np.array([[0.5, 0.5], [0.25, 0.5]])),
        mean_logprobs=np.log(np.array([0.375, 0.5])),
    )
    s = summarize_answer(sc)
    assert s["tokens"] == 2 and s["entropy_mean"] == 2.0 and s["entropy_max"] == 3.0
    assert s["epistemic_mean"] == pytest.approx(0.55) and s["epistemic_max"] == 1.0
    ll = np.log([0.25, 0.125])
    assert s["loglik_mean"] == pytest.approx(ll.mean()) and s["loglik_std"] == pytest.approx(ll.std())
    assert s["confidence"] == pytest.approx(np.sqrt(0.375 * 0.5))
    assert s["loglik"] == pytest.approx(np.log(0.375 * 0.5))
    assert decide(s, 0.5, None) == "low_confidence" and decide(s, 0.4, 0.5) == "high_epistemic"
    assert decide(s, 0.4, 0.6) is None and decide(s, None, None) is None
    rec = {"confidence": {"valid": True, "threshold": 0.3}, "epistemic": {"valid": False, "threshold": None}}
    assert thresholds_of(rec) == (0.3, None) and thresholds_of(None) == (None, None)


def test_stop_strings_streaming_and_logprobs(model):
    full = _gen(model, max_tokens=12, samples=0).choices[0]
    assert full.finish_reason in ("length", "stop") and len(full.text) > 6
    stop = full.text[4:6]
    seen = []
    req = GenerateRequest(
        adapter="a",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0.0,
        samples=3,
        stop=(stop, "\x00"),
        top_logprobs=2,
    )
    res = generate(model, req, threading.Lock(), 512, on_token=lambda i, t, info: seen.append((t, info)))
    c = res.choices[0]
    assert c.finish_reason == "stop" and c.text == full.text[: full.text.find(stop)]
    assert "".join(t for t, _ in seen) == c.text  # the stream carries exactly the returned text
    assert len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) == len(c.scores.entropy)
    assert all(len(t) == 2 and t[0][1] >= c.logprobs[k] - 1e-6 for k, t in enumerate(c.top_logprobs))
    assert model.tokenizer.decode(c.token_ids).startswith(c.text)


def test_seeded_sampling_n_and_cancel(model):
    a = _gen(model, temperature=1.0, top_p=0.9, seed=5, n=3, samples=0)
    b = _gen(model, temperature=1.0, top_p=0.9, seed=5, n=3, samples=0)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices] and len(a.choices) == 3
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 2

    req = GenerateRequest(adapter="a", prompt=PROMPT, max_tokens=50, temperature=0.0, samples=4)
    res = generate(model, req, threading.Lock(), 512, cancelled=cancelled)
    assert res.choices[0].finish_reason in ("cancelled", "stop") and len(res.choices[0].token_ids) <= 2
    assert res.choices[0].scores is None  # no uncertainty pass for a cancelled answer


def test_too_long_prompt_is_refused(model):
    with pytest.raises(PromptTooLong, match="at most 5"):
        generate(model, GenerateRequest(adapter="a", prompt=PROMPT), threading.Lock(), 5)
    from server.backend import BackendError
    from server.hf_generate import generate as served

    with pytest.raises(BackendError, match="at most 5 .*DALORRA_MAX_PROMPT_TOKENS"):  # the server's 422
        served(model, GenerateRequest(adapter="a", prompt=PROMPT), threading.Lock(), 5)


def test_short_answer_set_and_exact_match(data_dir):
    """What counts as a short-answer question (the generation thresholds' set) and as a correct answer."""
    from adapters.data import load_jsonl
    from adapters.short_answers import NEEDS_CHOICES, normalise, short_answer_items

    assert normalise(" The Carbon dioxide.\n") == "carbon dioxide"
    assert normalise("an Apple!") == "apple" and normalise("sunlight") != normalise("sunlight is reduced")
    items = short_answer_items(load_jsonl("arc_easy/test"), 30)
    assert len(items) == 30 and len({it.id for it in items}) == 30
    for it in items:
        gold = it.choices[it.label]
        assert (
            len(gold.split()) <= 3
            and it.question.rstrip().endswith("?")
            and not NEEDS_CHOICES.search(it.question)
        )
