"""LangChain's ChatOpenAI against a real server process on loopback (fake backend): the uncertainty reaches
`response_metadata["headers"]` with `include_response_headers=True` (it drops the body's `uncertainty`), usage
reaches `usage_metadata`, and a refusal names the field at fault (issue #27 item 2)."""

from __future__ import annotations

import pytest

from tests import fake_server

langchain_openai = pytest.importorskip("langchain_openai")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with fake_server.running(tmp_path_factory.mktemp("langchain")) as (url, _):
        yield url


def _chat(url: str, **kw):
    return langchain_openai.ChatOpenAI(
        model="fake",
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        include_response_headers=True,
        **kw,
    )


def test_multiple_choice_uncertainty_in_response_headers(url):
    llm = _chat(url, extra_body={"choices": ["the sun", "a stone"], "samples": 4})
    msg = llm.invoke("Which is a source of light?")
    h = msg.response_metadata["headers"]
    assert msg.content in ("the sun", "a stone")
    assert h["x-dalorra-kind"] == "multiple_choice"
    assert 0.5 <= float(h["x-dalorra-confidence"]) <= 1.0  # top-1 of two choices
    assert float(h["x-dalorra-epistemic"]) >= 0.0
    assert h["x-dalorra-decision"] in ("answer", "abstain")
    assert (h["x-dalorra-decision"] == "answer") == (h["x-dalorra-abstain-reason"] == "none")
    assert msg.usage_metadata["input_tokens"] > 0 and msg.usage_metadata["output_tokens"] == 0
    assert "uncertainty" not in msg.additional_kwargs  # why the headers exist


def test_generated_answer_uncertainty_in_response_headers(url):
    msg = _chat(url, max_tokens=3, temperature=0).invoke("Say hi")
    h = msg.response_metadata["headers"]
    assert h["x-dalorra-kind"] == "generation"
    assert 0.0 < float(h["x-dalorra-confidence"]) <= 1.0 and float(h["x-dalorra-epistemic"]) >= 0.0
    assert msg.usage_metadata["output_tokens"] >= 1


def test_refusal_names_the_field(url):
    llm = _chat(url, extra_body={"mask_seed": 2**64})
    with pytest.raises(openai.UnprocessableEntityError) as e:
        llm.invoke("hi")
    assert e.value.body["param"] == "mask_seed" and e.value.body["code"] == "less_than_equal"
