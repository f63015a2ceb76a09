"""Request models of the OpenAI-compatible routes (/v1/completions, /v1/chat/completions) and of KServe v2
inference. Imports only pydantic and the standard library. Responses are built as plain JSON in
server/openai_api.py and server/kserve.py (OpenAI's own shapes, plus one extra per-choice object).

Unknown fields are ignored, as OpenAI-compatible servers do, except the ones that would change the answer
and that this server cannot honour: those are refused with 422 (see `unsupported`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol import MAX_CHOICES

SEED_MAX = 2**63 - 1  # seeds are int64, as OpenAI documents them (torch's generator overflows at 2^64)
TOKEN_ID_MAX = (
    2**31 - 1
)  # a token id is checked against the vocabulary later; this only bounds the JSON number
TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX, strict=True)]


class StreamOptions(BaseModel):
    include_usage: bool = True  # the final chunk always carries usage (and the uncertainty) here


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1, description="The adapter that answers (GET /v1/models).")
    temperature: float = Field(
        1.0, ge=0, le=2, allow_inf_nan=False, description="Sampling temperature; 0 is greedy decoding."
    )
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, description="Up to 16 strings that end the answer (not returned)."
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Sampling seed (0 to 2^63 - 1): same seed, same answer."
    )
    n: int = Field(1, ge=1, description="Answers per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # ---- dalorra extensions (OpenAI clients pass them with extra_body) --------------------------------------
    choices: list[str] | None = Field(
        None,
        min_length=2,
        max_length=MAX_CHOICES,
        description="Multiple choice: score these answers as /predict does instead of generating.",
    )
    context: str | None = Field(None, description="Multiple choice: passage placed before the question.")
    samples: int | None = Field(
        None,
        ge=0,
        description="Mask draws S of the uncertainty pass (default: the "
        "adapter's); 0 skips it (plain mean-mask generation).",
    )
    mask_seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Seed of the S mask draws, 0 to 2^63 - 1 (default: the adapter's fixed draws, as /predict).",
    )
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (as vLLM's extension).")
    min_confidence: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="Override: abstain below this confidence."
    )
    max_epistemic: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Override: abstain above this epistemic score "
        "(generation: mean per-token MI in nats; choices: MI / log K).",
    )

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported(self) -> list[str]:
        """Fields a client set that would change the answer and that this server does not implement."""
        extra = self.model_extra or {}
        bad = [
            k
            for k in (
                "tools",
                "functions",
                "tool_choice",
                "function_call",
                "response_format",
                "logit_bias",
                "suffix",
                "prediction",
                "audio",
            )
            if extra.get(k)
        ]
        bad += [k for k in ("presence_penalty", "frequency_penalty") if extra.get(k) not in (None, 0, 0.0)]
        if extra.get("echo"):  # a declared field of completions; chat has no echo
            bad.append("echo")
        if extra.get("best_of") not in (None, 1):
            bad.append("best_of")
        return bad


class CompletionRequest(_Common):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        ...,
        description="The prompt: a string, a list of token ids, or a list of either (several prompts: their "
        "choices follow in prompt order, n per prompt).",
    )
    max_tokens: int | None = Field(
        16,
        ge=0,
        description="Tokens to generate at most (OpenAI's default: 16; 0 with echo scores the prompt).",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Return log-probabilities of each token and of this many most likely alternatives.",
    )
    echo: bool = Field(
        False,
        description="Return the prompt before the completion; with logprobs, the prompt tokens' log-probabilities "
        "too (the first token's is null), from the mean-mask network that also decodes.",
    )

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.get("type") != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most (default: the server's limit)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- tokenizer routes (vLLM's /tokenize, /detokenize: lm-evaluation-harness's remote tokenizer) ------------
class TokenizeRequest(BaseModel):
    model: str | None = Field(
        None, description="The adapter whose tokenizer (default: the server's default)."
    )
    prompt: str = Field(..., description="Text to tokenize.")
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (e.g. BOS).")


class DetokenizeRequest(BaseModel):
    model: str | None = Field(
        None, description="The adapter whose tokenizer (default: the server's default)."
    )
    tokens: list[TokenId] = Field(..., description="Token ids to turn back into text.")


# ---- KServe v2 / Open Inference Protocol ------------------------------------------------------------------
class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferOutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(..., min_length=1)
    outputs: list[InferOutputRequest] | None = None
