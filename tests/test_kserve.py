"""KServe v2 / Open Inference Protocol: metadata and inference with named tensors, against /predict."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.smollm

ITEMS = [
    ("Which gas do plants take in from the air to make food?", ["carbon dioxide", "oxygen", "nitrogen"]),
    ("Which of these is a source of light?", ["the Sun", "the Moon", "a mirror"]),
]


@pytest.fixture(scope="module")
def client(adapters_dir):
    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(adapters_dir=adapters_dir, default_adapter="test-ad"))) as c:
        yield c


def _infer_body(items, **params):
    K = max(len(c) for _, c in items)
    return {
        "id": "req-1",
        "parameters": params,
        "inputs": [
            {"name": "question", "shape": [len(items)], "datatype": "BYTES", "data": [q for q, _ in items]},
            {
                "name": "choices",
                "shape": [len(items), K],
                "datatype": "BYTES",
                "data": [c + [""] * (K - len(c)) for _, c in items],
            },
        ],
    }  # nested rows, "" padding


def test_metadata_names_the_tensors(client):
    m = client.get("/v2/models/test-ad").json()
    assert m["name"] == "test-ad" and m["platform"] == "dalorra"
    assert [t["name"] for t in m["inputs"]][:2] == ["question", "choices"]
    assert {"probabilities", "entropy", "epistemic", "decision"} <= {t["name"] for t in m["outputs"]}
    assert all({"name", "datatype", "shape"} <= set(t) for t in m["inputs"] + m["outputs"])
    assert (
        client.get("/v2/models/nope").status_code == 404 and "error" in client.get("/v2/models/nope").json()
    )
    assert client.get("/v2").json()["name"] == "dalorra"


def test_infer_equals_predict(client):
    items = ITEMS + [("Is ice cold?", ["yes", "no"])]  # a row with fewer choices, padded with ""
    r = client.post("/v2/models/test-ad/infer", json=_infer_body(items, samples=4, seed=3))
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["model_name"] == "test-ad" and r.json()["id"] == "req-1"
    assert out["probabilities"]["shape"] == [3, 3] and out["probabilities"]["datatype"] == "FP64"
    probs = np.array(out["probabilities"]["data"]).reshape(3, 3)
    for b, (q, ch) in enumerate(items):
        ref = client.post("/predict", json={"question": q, "choices": ch, "samples": 4, "seed": 3}).json()
        np.testing.assert_allclose(probs[b, : len(ch)], ref["probabilities"], atol=1e-12)
        assert probs[b, len(ch) :].sum() == 0
        for k in ("entropy", "epistemic", "confidence", "aleatoric"):
            assert out[k]["data"][b] == pytest.approx(ref[k], abs=1e-12)
        assert out["answer"]["data"][b] == ref["answer"] and out["decision"]["data"][b] == ref["decision"]
        assert out["abstain_reason"]["data"][b] == (ref["abstain_reason"] or "")


def test_flat_data_and_output_selection(client):
    body = _infer_body(ITEMS[:1], samples=2)
    body["inputs"][1]["data"] = ITEMS[0][1]  # flat row-major, shape [1, 3]
    body["outputs"] = [{"name": "epistemic"}, {"name": "answer"}]
    r = client.post("/v2/models/test-ad/infer", json=body).json()
    assert [o["name"] for o in r["outputs"]] == ["epistemic", "answer"]


@pytest.mark.parametrize(
    "mutate, status",
    [
        (lambda b: b["inputs"][1].update(shape=[2, 4]), 400),  # shape does not match data
        (lambda b: b["inputs"].pop(0), 400),  # no question
        (lambda b: b["inputs"][0].update(datatype="FP32"), 400),
        (lambda b: b.update(outputs=[{"name": "nope"}]), 400),
        (
            lambda b: b["inputs"][1].update(data=[["only one", "", ""], ["a", "b", ""]]),
            400,
        ),  # one choice left
    ],
)
def test_bad_requests_answer_the_protocol_error_shape(client, mutate, status):
    body = _infer_body(ITEMS)
    mutate(body)
    r = client.post("/v2/models/test-ad/infer", json=body)
    assert r.status_code == status and isinstance(r.json()["error"], str), r.text
