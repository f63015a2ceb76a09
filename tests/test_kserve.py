"""KServe v2 / Open Inference Protocol: metadata, versions, inference with named tensors (JSON and the binary tensor
data extension), the protocol's error shape, refusals counted; driven by tritonclient against a real uvicorn on a
fake backend (no model), and against /predict on the real SmolLM2 adapter."""

import gzip
import json
import struct
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.fake_backend import FakeBackend
from tests.server_utils import free_port

ITEMS = [
    ("Which gas do plants take in from the air to make food?", ["carbon dioxide", "oxygen", "nitrogen"]),
    ("Which of these is a source of light?", ["the Sun", "the Moon", "a mirror"]),
]
LOCAL = {"client": ("127.0.0.1", 40000), "base_url": "http://127.0.0.1:8000"}


@pytest.fixture(scope="module")
def client(adapters_dir):
    with TestClient(create_app(Settings(adapters_dir=adapters_dir, default_adapter="test-ad"))) as c:
        yield c


def _fake_settings(root, **kw) -> Settings:
    for name in ("fake", "spare"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "adapter_config.json").write_text("{}")
    return Settings(
        adapters_dir=root,
        default_adapter="fake",
        feedback_key="a-test-only-feedback-key-0123",
        max_wait_ms=0,
        **kw,
    )


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A TestClient on the fake backend (logits a pure function of the request)."""
    app = create_app(_fake_settings(tmp_path_factory.mktemp("kserve")), FakeBackend())
    with TestClient(app, raise_server_exceptions=False, **LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real uvicorn on loopback, fake backend: what tritonclient talks to. Yields (url, app)."""
    import uvicorn

    app = create_app(_fake_settings(tmp_path_factory.mktemp("kserve-uvicorn")), FakeBackend())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.time() + 60
    while not server.started and time.time() < end:
        time.sleep(0.05)
    assert server.started
    yield f"127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(30)


def _count(app, adapter: str, outcome: str) -> float:
    v = app.state.metrics.registry.get_sample_value(
        "dalorra_requests_total", {"adapter": adapter, "outcome": outcome}
    )
    return v or 0.0


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


def test_metadata_names_the_tensors(fake):
    m = fake.get("/v2/models/fake").json()
    assert m["name"] == "fake" and m["platform"] == "dalorra" and m["versions"] == ["1"]
    assert [t["name"] for t in m["inputs"]][:2] == ["question", "choices"]
    assert {"probabilities", "entropy", "epistemic", "decision"} <= {t["name"] for t in m["outputs"]}
    assert all({"name", "datatype", "shape"} <= set(t) for t in m["inputs"] + m["outputs"])
    assert fake.get("/v2/models/fake/versions/1").json() == m
    for path in ("/v2/models/nope", "/v2/models/fake/versions/2", "/v2/models/spare/versions/1"):
        r = fake.get(path)  # unknown model, unknown version, an adapter on disk but not loaded
        assert r.status_code == 404 and isinstance(r.json()["error"], str), (path, r.text)
    assert (
        "spare" in fake.get("/v2/models/spare").json()["error"]
        and "load" in fake.get("/v2/models/spare").text
    )
    assert fake.get("/v2").json() == {
        "name": "dalorra",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


@pytest.mark.smollm
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


def test_flat_data_and_output_selection(fake):
    body = _infer_body(ITEMS[:1], samples=2)
    body["inputs"][1]["data"] = ITEMS[0][1]  # flat row-major, shape [1, 3]
    body["outputs"] = [{"name": "epistemic"}, {"name": "answer"}]
    r = fake.post("/v2/models/fake/infer", json=body).json()
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
def test_bad_requests_answer_the_protocol_error_shape(fake, mutate, status):
    body = _infer_body(ITEMS)
    mutate(body)
    r = fake.post("/v2/models/fake/infer", json=body)
    assert r.status_code == status and isinstance(r.json()["error"], str), r.text


# ---- tritonclient, with its defaults, against a real server --------------------------------------------------------
QUESTIONS = np.array(["Is ice cold?", "Which one is red?"], dtype=object)
CHOICES = np.array([["yes", "no", ""], ["a rose", "grass", "the sky"]], dtype=object)  # row 0 padded with ""


def _triton_inputs(binary: bool = True):
    import tritonclient.http as th

    q = th.InferInput("question", list(QUESTIONS.shape), "BYTES")
    q.set_data_from_numpy(QUESTIONS, binary_data=binary)
    c = th.InferInput("choices", list(CHOICES.shape), "BYTES")
    c.set_data_from_numpy(CHOICES, binary_data=binary)
    return [q, c]


def _predicted(url: str) -> list[dict]:
    """/predict's answers for QUESTIONS × CHOICES at samples=3, seed=7: what every KServe answer must equal."""
    out = []
    for q, row in zip(QUESTIONS, CHOICES, strict=True):
        body = {"question": q, "choices": [c for c in row if c], "samples": 3, "seed": 7}
        out.append(httpx.post(f"http://{url}/predict", json=body).json())
    return out


def test_tritonclient_reads_metadata_and_readiness(served):
    import tritonclient.http as th

    url, _ = served
    with th.InferenceServerClient(url) as c:
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("fake") and c.is_model_ready("fake", "1")
        assert not c.is_model_ready("nope") and not c.is_model_ready("fake", "2")
        assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
        m = c.get_model_metadata("fake")
        assert c.get_model_metadata("fake", "1") == m and m["versions"] == ["1"]
        assert [t["name"] for t in m["inputs"]] == ["question", "choices", "context"]
        assert {"probabilities", "epistemic", "decision"} <= {t["name"] for t in m["outputs"]}


def test_tritonclient_infer_with_its_defaults_binary_in_and_out(served):
    """tritonclient's defaults: no Content-Type, binary inputs, every output binary; values equal /predict's."""
    import tritonclient.http as th

    url, _ = served
    with th.InferenceServerClient(url) as c:
        r = c.infer("fake", _triton_inputs(), request_id="req-7", parameters={"samples": 3, "seed": 7})
    head = r.get_response()
    assert head["id"] == "req-7" and head["model_name"] == "fake" and head["model_version"] == "1"
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in head["outputs"])
    ref = _predicted(url)
    probs = r.as_numpy("probabilities")
    assert probs.shape == (2, 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs[0, :2], ref[0]["probabilities"], atol=1e-12)
    np.testing.assert_allclose(probs[1], ref[1]["probabilities"], atol=1e-12)
    assert probs[0, 2] == 0.0
    assert r.as_numpy("answer").tolist() == [x["answer"].encode() for x in ref]
    assert r.as_numpy("answer_index").dtype == np.int64
    assert r.as_numpy("answer_index").tolist() == [x["answer_index"] for x in ref]
    np.testing.assert_allclose(r.as_numpy("epistemic"), [x["epistemic"] for x in ref], atol=1e-12)
    assert r.as_numpy("decision").tolist() == [x["decision"].encode() for x in ref]


def test_tritonclient_infer_json_versioned_and_compressed(served):
    """JSON inputs, a chosen output as JSON beside a binary one, the /versions/1 route, gzip both ways."""
    import tritonclient.http as th

    url, _ = served
    outputs = [th.InferRequestedOutput("probabilities", binary_data=False), th.InferRequestedOutput("answer")]
    with th.InferenceServerClient(url) as c:
        plain = c.infer(
            "fake", _triton_inputs(binary=False), outputs=outputs, parameters={"samples": 3, "seed": 7}
        )
        zipped = c.infer(
            "fake",
            _triton_inputs(),
            model_version="1",
            outputs=outputs,
            parameters={"samples": 3, "seed": 7},
            request_compression_algorithm="gzip",
            response_compression_algorithm="gzip",
        )
    for r in (plain, zipped):
        out = r.get_response()["outputs"]
        assert [o["name"] for o in out] == ["probabilities", "answer"]
        assert len(out[0]["data"]) == 6 and out[1]["parameters"]["binary_data_size"] > 0
        np.testing.assert_array_equal(r.as_numpy("probabilities"), plain.as_numpy("probabilities"))
        assert r.as_numpy("answer").tolist() == [x["answer"].encode() for x in _predicted(url)]


def test_tritonclient_errors_are_readable(served):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    url, app = served
    before = _count(app, "unknown", "invalid"), _count(app, "fake", "invalid")
    with th.InferenceServerClient(url) as c:
        cases = [
            (lambda: c.infer("nope", _triton_inputs()), "404", "nope"),
            (lambda: c.infer("fake", _triton_inputs()[:1]), "400", "choices"),
            (lambda: c.infer("fake", _triton_inputs(), model_version="2"), "404", "version"),
            (lambda: c.get_model_config("fake"), "404", "/v2/models/fake/config"),  # a Triton-only route
        ]
        for call, status, word in cases:
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == status and isinstance(info.value.message(), str)
            assert str(info.value).startswith(f"[{status}] ") and word in str(info.value), str(info.value)
    assert _count(app, "unknown", "invalid") == before[0] + 1  # the unknown model
    assert _count(app, "fake", "invalid") == before[1] + 2  # missing input, unknown version


# ---- the wire format, by hand ------------------------------------------------------------------------------------
def _bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def _binary_request(header: dict, *blobs: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def _split(r) -> tuple[dict, bytes]:
    n = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:n]), r.content[n:]


def test_binary_tensor_data_on_the_wire(fake):
    """The extension as the protocol writes it, without tritonclient: JSON header, then little-endian data."""
    q, c = ["Is ice cold?"], ["yes", "no"]
    header = {
        "inputs": [
            {"name": "question", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 16}},
            {"name": "choices", "shape": [1, 2], "datatype": "BYTES", "data": c},  # JSON beside binary
        ],
        "outputs": [
            {"name": "answer_index", "parameters": {"binary_data": True}},
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "answer", "parameters": {"binary_data": True}},
            {"name": "confidence"},
        ],
        "parameters": {"samples": 3, "seed": 7},
    }
    assert len(_bytes_tensor(q)) == 16
    body, headers = _binary_request(header, _bytes_tensor(q))
    r = fake.post("/v2/models/fake/infer", content=body, headers=headers)  # no Content-Type at all
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    head, data = _split(r)
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in head["outputs"]]
    assert sizes == [8, 16, 4 + len("no"), None] and len(data) == sum(sizes[:3])
    ref = fake.post("/predict", json={"question": q[0], "choices": c, "samples": 3, "seed": 7}).json()
    assert struct.unpack("<q", data[:8]) == (ref["answer_index"],)
    assert list(struct.unpack("<2d", data[8:24])) == pytest.approx(ref["probabilities"], abs=1e-12)
    assert data[24:] == _bytes_tensor([ref["answer"]])
    assert head["outputs"][3]["data"] == [pytest.approx(ref["confidence"], abs=1e-12)]


def test_json_without_content_type_and_binary_data_output(fake):
    body = json.dumps({**_infer_body(ITEMS), "parameters": {"binary_data_output": True}}).encode()
    r = fake.post("/v2/models/fake/infer", content=body)
    assert r.status_code == 200 and "content-type" not in r.request.headers
    head, data = _split(r)
    every = [o["name"] for o in fake.get("/v2/models/fake").json()["outputs"]]
    assert [o["name"] for o in head["outputs"]] == every  # no `outputs`: all of them, in metadata order
    assert sum(o["parameters"]["binary_data_size"] for o in head["outputs"]) == len(data)
    r = fake.post("/v2/models/fake/infer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    r = fake.post("/v2/models/fake/infer", content=body, headers={"Content-Type": "text/plain"})  # a form's
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]


Q1 = {"name": "question", "shape": [1], "datatype": "BYTES"}
C1 = {"name": "choices", "shape": [1, 2], "datatype": "BYTES", "data": ["yes", "no"]}


def _with_binary(q_params: dict, blob: bytes, extra_head: int = 0):
    body, headers = _binary_request({"inputs": [{**Q1, "parameters": q_params}, C1]}, blob)
    headers["Inference-Header-Content-Length"] = str(
        int(headers["Inference-Header-Content-Length"]) + extra_head
    )
    return body, headers


@pytest.mark.parametrize(
    "body, headers, word",
    [
        (*_with_binary({"binary_data_size": 6}, _bytes_tensor(["hi"]) + b"xx"), "add up to 6"),
        (*_with_binary({"binary_data_size": 9}, _bytes_tensor(["hi?"])), "only 7 bytes"),
        (*_with_binary({"binary_data_size": 7}, struct.pack("<I", 9) + b"hi?"), "element 0 is 9 bytes"),
        (*_with_binary({"binary_data_size": 2}, b"\x01\x00"), "inside the length"),
        (*_with_binary({"binary_data_size": 6}, struct.pack("<I", 2) + b"\xff\xfe"), "not UTF-8"),
        (*_with_binary({"binary_data_size": True}, _bytes_tensor(["hi"])), "byte count"),
        (*_with_binary({"shared_memory_region": "r0"}, b""), "shared memory"),
        (*_with_binary({"binary_data_size": 6}, _bytes_tensor(["hi"]), extra_head=100), "the body has"),
        (b"{}", {"Inference-Header-Content-Length": "0"}, "raw binary"),
        (b"{}", {"Inference-Header-Content-Length": "-3"}, "byte count"),
        (b"\xff{}", {"Inference-Header-Content-Length": "3"}, "not UTF-8"),
        (b'{"inputs": [1, ', {}, "not valid JSON"),
        (b'{"inputs": NaN}', {}, "NaN"),
        (b"[" * 100_000, {}, ""),  # nested past the parser's recursion limit
        (b'["not an object"]', {}, "JSON object"),
        (json.dumps({"inputs": [{**C1, "shape": [1, -2]}]}).encode(), {}, "greater than or equal to 0"),
        (json.dumps({"inputs": [{**C1, "shape": ["1", 2]}]}).encode(), {}, "shape"),
        (json.dumps({"inputs": [C1, C1, {**Q1, "data": ["q"]}]}).encode(), {}, "each name once"),
        (json.dumps({"inputs": [{**Q1, "data": ["q"]}, {**C1, "data": ["a"]}]}).encode(), {}, "holds 2"),
        (
            json.dumps({"inputs": [{**Q1, "data": ["q"]}, {**C1, "data": [["a"], ["b"]]}]}).encode(),
            {},
            "rows",
        ),
        (
            json.dumps({"inputs": [{**Q1, "data": ["q"]}, C1], "outputs": [{"name": "answer"}] * 2}).encode(),
            {},
            "twice",
        ),
        (
            json.dumps(
                {"inputs": [{**Q1, "data": ["q"]}, C1], "parameters": {"binary_data_output": "yes"}}
            ).encode(),
            {},
            "true or false",
        ),
        (
            json.dumps(
                {
                    "inputs": [{**Q1, "data": ["q"]}, C1],
                    "outputs": [{"name": "answer", "parameters": {"classification": 2}}],
                }
            ).encode(),
            {},
            "classification",
        ),
        (json.dumps({"inputs": [{**Q1, "data": ["\ud800"]}, C1]}).encode(), {}, "lone surrogate"),
        (
            json.dumps({"inputs": [{**Q1, "data": ["q"], "datatype": "\udfff"}, C1]}).encode(),
            {},
            "lone surrogate",
        ),
    ],
)
def test_malformed_requests_are_400_strings_and_counted(fake, body, headers, word):
    before = _count(fake.app, "fake", "invalid")
    r = fake.post("/v2/models/fake/infer", content=body, headers=headers)
    assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text
    assert word in r.json()["error"]
    assert _count(fake.app, "fake", "invalid") == before + 1


def test_lone_surrogate_id_is_a_counted_400_not_a_500(fake):
    """Issue #28: the id was echoed into a response that could not be encoded (a 500, after counting ok)."""
    ok, invalid = _count(fake.app, "fake", "ok"), _count(fake.app, "fake", "invalid")
    body = json.dumps({**_infer_body(ITEMS), "id": "req-\ud800"}).encode()  # a valid JSON escape, not text
    r = fake.post("/v2/models/fake/infer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "id contains a lone surrogate" in r.json()["error"], r.text
    assert _count(fake.app, "fake", "ok") == ok and _count(fake.app, "fake", "invalid") == invalid + 1


def test_v2_errors_are_strings_with_the_protocols_status(fake):
    r = fake.get("/v2/repository/index")
    assert r.status_code == 404 and "no route GET /v2/repository/index" in r.json()["error"]
    r = fake.get("/v2/models/fake/infer")
    assert r.status_code == 405 and isinstance(r.json()["error"], str) and "POST" in r.headers["allow"]
    r = fake.get("/v2/models/nope/ready")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    assert fake.get("/v2/models/fake/ready").json() == {"name": "fake", "ready": True}
    assert fake.get("/v2/models/fake/versions/1/ready").json() == {"name": "fake", "ready": True}
    assert (
        fake.get("/health/nope").json()["error"]["type"] == "http_error"
    )  # the rest of the API keeps its shape
    # the service's own refusals: a 422 on /predict is the protocol's 400 here
    body = _infer_body([("   ", ["a", "b"])])
    r = fake.post("/v2/models/fake/infer", json=body)
    assert r.status_code == 400 and "empty" in r.json()["error"]
    assert fake.post("/predict", json={"question": "   ", "choices": ["a", "b"]}).status_code == 422


def test_versions(fake):
    body = _infer_body(ITEMS, samples=2, seed=1)
    a = fake.post("/v2/models/fake/infer", json=body).json()
    b = fake.post("/v2/models/fake/versions/1/infer", json=body).json()
    assert a == b and a["model_version"] == "1"
    r = fake.post("/v2/models/fake/versions/2/infer", json=body)
    assert r.status_code == 404 and "version '2'" in r.json()["error"]


def test_refusals_before_the_app_are_counted(tmp_path):
    """Issue #28: refusals on KServe routes count in dalorra_requests_total as /predict's do, also those the
    request guard answers (no token, a body over the limit, decompressed or not) and the 405."""
    settings = _fake_settings(tmp_path, api_token="s3cret-token", max_body_bytes=4096)
    auth = {"Authorization": "Bearer s3cret-token"}
    with TestClient(create_app(settings, FakeBackend()), raise_server_exceptions=False, **LOCAL) as c:
        app = c.app
        assert c.post("/v2/models/fake/infer", json=_infer_body(ITEMS)).status_code == 401
        assert c.post("/v2/models/fake/infer", content=b"x" * 5000, headers=auth).status_code == 413
        bomb = gzip.compress(json.dumps({**_infer_body(ITEMS), "id": "x" * 10_000}).encode())
        assert len(bomb) < 4096
        r = c.post("/v2/models/fake/infer", content=bomb, headers={**auth, "Content-Encoding": "gzip"})
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        assert c.get("/v2/models/fake/infer", headers=auth).status_code == 405
        assert c.get("/v2/models/fake", headers=auth).status_code == 200  # metadata: not a prediction
        assert _count(app, "unknown", "invalid") == 3 and _count(app, "fake", "invalid") == 1
        r = c.post("/v2/models/fake/infer", json=_infer_body(ITEMS), headers=auth)
        assert r.status_code == 200 and _count(app, "fake", "ok") == 2  # per item, by the service
