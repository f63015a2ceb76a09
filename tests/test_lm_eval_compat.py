"""lm-evaluation-harness's `local-completions` against /v1/completions, with its defaults (issue #27 item 1).

The requests are the shapes lm-eval 0.4.13 sends (lm_eval/models/openai_completions.py, api_models.py, utils.py):
loglikelihood as token ids with echo, logprobs 1 and max_tokens 1 (it drops the generated token with
`token_logprobs[ctxlen:-1]`), generate_until as token ids with `until` + EOS as stop strings, batches as lists of
prompts, and its remote-tokenizer probe of /tokenizer_info and /tokenize. They run against the app on the real HF
backend with the tiny random Llama, and the answers are checked against the adapter's mean-mask network computed
in this process, against the server's own decoding, and against the cloze scoring code. Where lm-eval is
installed (the `lm-eval` extra), its own parser reads the responses too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import randomize_lora

CONTEXT = "Question: Which gas do plants take in?\nAnswer:"
CONTINUATIONS = [" carbon dioxide", " oxygen"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_dir):
    """A DALorRA adapter on the tiny base with random B (masks disagree), and the same adapter in-process."""
    from adapters.adapter_io import load_adapter, save_adapter
    from adapters.basemodel import load_base
    from adapters.config import AdapterConfig, PromptFormat
    from adapters.model import DalorraModel

    root = tmp_path_factory.mktemp("lm-eval-adapters")
    base, tok = load_base(str(tiny_dir))
    model = DalorraModel(
        base, tok, AdapterConfig(), PromptFormat(mode="cloze", normalize="tokens"), str(tiny_dir), seed=0
    )
    randomize_lora(model, std=0.3)
    save_adapter(model, root / "ad", extra={"default_samples": 2})
    base, tok = load_base(str(tiny_dir))
    return root, load_adapter(root / "ad", base, tok).eval()


@pytest.fixture(scope="module")
def client(adapter, tiny_dir):
    from server.app import create_app
    from server.settings import Settings

    root, _ = adapter
    settings = Settings(
        adapters_dir=root, default_adapter="ad", base_model=str(tiny_dir), max_tokens=16, max_prompt_tokens=64
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _mean_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(L−1, V) log p(· | x_≤t) of the mean-mask network, one plain forward (the reference)."""
    from adapters.generate import mean_masks

    x = torch.tensor([ids])
    with torch.no_grad(), model.row_masks(mean_masks(model), torch.zeros(1, dtype=torch.long)):
        h = model.decoder(input_ids=x).last_hidden_state[0]
        return torch.log_softmax(model.lm_head(h[None, :-1])[0].float(), -1)


def _loglikelihood_payload(ids: list[int]) -> dict:
    """lm-eval 0.4.13 LocalCompletionsAPI._create_payload(generate=False), batch_size 1."""
    return {
        "model": "ad",
        "prompt": [ids],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair: the continuation's ids are the whole's after the context's."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def test_loglikelihood_request_returns_the_prompt_tokens_logprobs(client, adapter):
    _, model = adapter
    ctx, cont = _encode_pair(model.tokenizer, CONTEXT, CONTINUATIONS[0])
    ids = ctx + cont
    r = client.post("/v1/completions", json=_loglikelihood_payload(ids))
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the one generated token lm-eval drops
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _mean_logprobs(model, ids)  # (L−1, V)
    want = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(lp["token_logprobs"][1 : len(ids)], want, rtol=1e-4, atol=1e-5)
    for t in range(1, len(ids)):  # logprobs=1: the single most likely token and its log-probability
        (best,) = lp["top_logprobs"][t].values()
        assert best == pytest.approx(float(ref[t - 1].max()), abs=1e-5)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert choice["text"].startswith(model.tokenizer.decode(ids))  # echo: the prompt, then the completion
    # lm-eval's own reading: Σ token_logprobs[ctxlen:-1], greedy iff each token is its position's top-1
    total = sum(lp["token_logprobs"][len(ctx) : -1])
    assert total == pytest.approx(float(want[len(ctx) - 1 :].sum()), abs=1e-4)
    greedy = all(
        t == max(top.values())
        for t, top in zip(lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1], strict=True)
    )
    assert greedy == all(int(ref[t - 1].argmax()) == ids[t] for t in range(len(ctx), len(ids)))
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    ((ll, is_greedy),) = lm_eval.LocalCompletionsAPI.parse_logprobs(r.json(), [ids], [len(ctx)])
    assert (ll, is_greedy) == (pytest.approx(total), greedy)


def test_echo_logprobs_are_the_network_that_decodes(client):
    """Generated tokens' log-probabilities (KV-cached decoding) equal the same tokens' echoed log-probabilities
    (one teacher-forced forward): one network, the mean-mask one."""
    gen = client.post(
        "/v1/completions",
        json={
            "model": "ad",
            "prompt": CONTEXT,
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": 0,
            "samples": 0,
        },
    ).json()["choices"][0]
    prompt_ids = client.post("/tokenize", json={"model": "ad", "prompt": CONTEXT}).json()["tokens"]
    body = {"model": "ad", "prompt": CONTEXT + gen["text"], "max_tokens": 0, "echo": True, "logprobs": 0}
    echoed = client.post("/v1/completions", json=body).json()
    lp = echoed["choices"][0]["logprobs"]["token_logprobs"]
    n = len(gen["logprobs"]["tokens"])
    assert len(lp) == len(prompt_ids) + n  # the decoded text re-tokenizes to the same tokens here
    np.testing.assert_allclose(lp[-n:], gen["logprobs"]["token_logprobs"], rtol=1e-4, atol=1e-5)
    c = echoed["choices"][0]
    assert c["text"] == CONTEXT + gen["text"] and c["finish_reason"] == "length" and c["uncertainty"] is None
    assert echoed["usage"] == {"prompt_tokens": len(lp), "completion_tokens": 0, "total_tokens": len(lp)}


def test_echo_scores_equal_the_cloze_scoring_code(client, adapter):
    """Σ of a choice's echoed continuation log-probabilities / its tokens = adapters.scoring's cloze logit under
    the mean-mask network: lm-eval through the server sees what `dalorra eval` scores, network for network."""
    from adapters.data import Item
    from adapters.generate import mean_masks
    from adapters.scoring import choice_logits, encode

    _, model = adapter
    item = Item(
        question="Which gas do plants take in?", choices=tuple(c.strip() for c in CONTINUATIONS), label=0
    )
    enc = encode([item], model.tokenizer, model.fmt)
    with torch.no_grad():
        want = choice_logits(model, enc, [0], mean_masks(model), torch.zeros(1, dtype=torch.long))[0]
    got = []
    for k, cont in enumerate(enc[0].conts):
        ids = list(enc[0].prompt) + list(cont)
        lp = client.post("/v1/completions", json=_loglikelihood_payload(ids)).json()["choices"][0]["logprobs"]
        got.append(sum(lp["token_logprobs"][len(enc[0].prompt) : -1]) / enc[0].norms[k])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_a_batch_of_prompts_answers_each_in_order(client, adapter):
    _, model = adapter
    pairs = [_encode_pair(model.tokenizer, CONTEXT, c) for c in CONTINUATIONS]
    batch = [a + b for a, b in pairs]
    r = client.post("/v1/completions", json={**_loglikelihood_payload(batch[0]), "prompt": batch})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for ids, c in zip(batch, out["choices"], strict=True):
        alone = client.post("/v1/completions", json=_loglikelihood_payload(ids)).json()["choices"][0]
        assert c["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=1e-5)
        assert c["text"] == alone["text"]
    assert out["usage"]["prompt_tokens"] == sum(len(b) for b in batch)
    texts = client.post(  # tokenized_requests=False with batch_size > 1: a list of strings
        "/v1/completions",
        json={"model": "ad", "prompt": ["Hello", "The sky is"], "max_tokens": 2, "temperature": 0},
    ).json()
    assert [c["index"] for c in texts["choices"]] == [0, 1] and len(texts["choices"]) == 2


def test_generate_until_request(client, adapter):
    """lm-eval's generate_until: token ids, `until` + the EOS string as stops (5 here: more than OpenAI's 4)."""
    _, model = adapter
    ids = model.tokenizer(CONTEXT, add_special_tokens=False).input_ids
    stop = ["\n\n", "Question:", "</s>", "<|im_end|>", "\nQ:"]
    body = {"model": "ad", "max_tokens": 6, "temperature": 0, "stop": stop, "seed": 1234}
    r = client.post("/v1/completions", json={**body, "prompt": [ids]})
    assert r.status_code == 200, r.text
    as_text = client.post("/v1/completions", json={**body, "prompt": CONTEXT}).json()
    assert r.json()["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert r.json()["usage"] == as_text["usage"]


def test_remote_tokenizer_routes(client, adapter):
    """What lm-eval's tokenizer_backend='auto' probes and then uses instead of loading a tokenizer by name."""
    _, model = adapter
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == model.tokenizer.eos_token and "chat_template" in info
    r = client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert r["tokens"] == model.tokenizer("test", add_special_tokens=False).input_ids and r["count"] >= 1
    eos = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"][0] == model.tokenizer.eos_token_id  # RemoteTokenizer.eos_token_id
    ids = model.tokenizer(CONTEXT, add_special_tokens=False).input_ids
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": CONTEXT}


@pytest.mark.parametrize(
    "prompt, param",
    [
        ([], "prompt"),
        ([[]], "prompt"),
        ([10**6], "prompt"),
        ([[1, 2], [2**40]], "prompt.1.0"),
        ([1] * 65, "prompt"),
    ],
)
def test_bad_token_prompts_are_422_naming_the_prompt(client, prompt, param):
    r = client.post("/v1/completions", json={**_loglikelihood_payload([1]), "prompt": prompt})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] in (param, "prompt") and err["code"] and err["message"]


def test_echo_stream_sends_the_prompt_first(client, adapter):
    _, model = adapter
    ids = model.tokenizer(CONTEXT, add_special_tokens=False).input_ids
    body = {**_loglikelihood_payload(ids), "max_tokens": 3, "stream": True, "samples": 0}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    import json

    assert events[-1] == "[DONE]"
    first = json.loads(events[0])["choices"][0]
    assert first["text"] == model.tokenizer.decode(ids)
    assert first["logprobs"]["token_logprobs"][0] is None and len(first["logprobs"]["tokens"]) == len(ids)
