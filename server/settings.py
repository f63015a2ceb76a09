"""Server settings: environment variables with the DALORRA_ prefix, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DALORRA_", extra="ignore")

    host: str = Field(
        "127.0.0.1",
        description="bind address; 0.0.0.0 serves the network (admin routes then need a "
        "token, and a fixed FEEDBACK_KEY is wanted for replicas)",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    backend: str = Field(
        "hf", description="hf (transformers, CPU or GPU) or vllm (mask bank; pip extra [vllm])"
    )
    base_model: str | None = Field(None, description="HF id or directory; default the embedded SmolLM2")
    device: str = Field("cpu", description="torch device of the HF backend (cpu, cuda, cuda:1, ...)")
    dtype: str = Field(
        "auto",
        description="HF backend precision of the base model: auto (bfloat16 on CUDA and on CPUs with "
        "AVX512-BF16/AMX, else float32), float32, bfloat16, float16; adapter factors, softmax, entropy and MI "
        "stay float32 (fidelity: bench/results/multi_adapter.md)",
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    adapters_dir: Path = Field(REPO / "adapters" / "default", description="adapters load by name from here")
    default_adapter: str = Field(
        "arc-easy-dalorra", description="adapter loaded at start and used when a request names none"
    )
    preload: list[str] = Field(default_factory=list, description="more adapters to load at start")
    default_samples: int = Field(10, ge=1, description="S when neither the request nor the adapter says")
    max_samples: int = Field(64, ge=1, description="largest S a request may ask for")
    max_items: int = Field(64, ge=1, description="items per /predict request")
    max_question_chars: int = Field(4000, ge=1, description="longest question (characters)")
    max_choice_chars: int = Field(1000, ge=1, description="longest choice (characters)")
    max_body_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="largest request body, counted on the bytes read (chunked included): 413 beyond",
    )
    max_batch_rows: int = Field(160, ge=1, description="rows (Σ requests × S) per backend call")
    max_forward_rows: int = Field(
        20, ge=1, description="rows per model forward (HF backend splits larger batches)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long the batcher waits to fill a batch")
    max_queue_rows: int = Field(4000, ge=1, description="queued rows beyond which requests get 429")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="deadline of a /predict request; requests that "
        "cannot finish within it at the measured drain rate get 429 at once",
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body stalled this long (between reads) gets 408"
    )
    head_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection whose request line and headers are not "
        "complete this long after it opened is closed",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host header values served, comma-separated (DNS-rebinding guard); empty: any",
    )
    feedback_key: str | None = Field(
        None,
        min_length=8,
        description="HMAC key for receipts, shared by replicas; "
        "unset: a random key per process (feedback then stays on that replica)",
    )
    receipt_ttl_s: float = Field(
        7 * 24 * 3600, gt=0, description="how long a prediction's receipt can be used for feedback"
    )
    unfamiliar_alpha: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="level α_u below which a request's unfamiliarity p-value counts as unfamiliar (abstain reason "
        "`unfamiliar` together with the adapter's stricter rule); unset: the adapter's fitted level (0.05)",
    )
    shift_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="shift monitor's false-alarm level: within one test period the alarm is raised on "
        "in-distribution traffic with probability at most this (conformal test martingale, Ville's inequality)",
    )
    shift_action: Literal["strict", "alert"] = Field(
        "strict",
        description="what a raised shift alarm does to an adapter's decisions: `strict` puts every request under "
        "the adapter's stricter (unfamiliar-input) rule until the test period ends or the adapter is reloaded "
        "(abstain reason `shift_alarm`); `alert` only reports it (metrics, alert rule, /v1/adapters/{name})",
    )
    shift_period: int = Field(
        10_000, ge=10, description="requests per shift test period (the monitor then restarts its test)"
    )
    shift_window: int = Field(
        200, ge=1, description="recent requests behind the label-free accuracy estimate and unfamiliar share"
    )
    result_cache_size: int = Field(4096, ge=0, description="seeded results kept (LRU); 0 disables the cache")
    length_bucketing: bool = Field(
        False,
        description="HF backend: group rows of similar length into a forward "
        "(measured 0.94× on the 2-core CPU: bench/results/optimisations.md)",
    )
    compile: bool = Field(
        False,
        description="HF backend: torch.compile every decoder layer's MLP and norms at adapter "
        "load and warm them up before the adapter serves (readiness waits); measured 1.07×, within noise, on "
        "the 2-core CPU (bench/results/optimisations.md)",
    )
    adaptive: bool = Field(
        False, description="adaptive sampling by default (a request's `adaptive` overrides)"
    )
    adaptive_first: int = Field(4, ge=2, description="adaptive sampling: draws in the first round")
    adaptive_step: int = Field(3, ge=1, description="adaptive sampling: draws added per further round")
    adaptive_tolerance: float = Field(
        0.02, gt=0, description="Monte Carlo error allowed on p_top and normalised MI"
    )
    adaptive_z: float = Field(2.0, gt=0, description="error bands are z standard errors wide")
    # Text generation (/v1/completions, /v1/chat/completions; README "OpenAI-compatible API")
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a generation request may ask for")
    max_prompt_tokens: int = Field(
        2048, ge=1, description="longest generation prompt (tokens, chat template included)"
    )
    max_n: int = Field(4, ge=1, description="largest n (answers per generation request)")
    generation_slots: int = Field(
        2,
        ge=1,
        description="generations decoding at once (each its own path, not the "
        "batcher; decoding steps and /predict batches take turns on the model)",
    )
    generation_queue: int = Field(
        16, ge=0, description="generation requests waiting for a slot beyond which 429"
    )
    generation_decision: Path | None = Field(
        None,
        description="JSON {adapter: decision record} of generation "
        "thresholds; default: <adapter dir>/generation_decision.json",
    )
    # vLLM backend only (README "GPU serving with vLLM"): each adapter becomes a bank of pre-masked LoRAs.
    vllm_bank_size: int = Field(
        32, ge=1, description="mask draws M per DALorRA adapter; a request's S must be <= M"
    )
    vllm_bank_seed: int = Field(
        0, description="seed of the bank's mask draws (recorded in the adapter's info)"
    )
    vllm_max_loras: int = Field(16, ge=1, description="distinct LoRAs in one vLLM batch; set it >= S")
    vllm_max_cpu_loras: int = Field(128, ge=1, description="LoRAs vLLM keeps in host memory (all banks)")
    vllm_max_lora_rank: int = Field(
        32, description="largest adapter rank (1, 8, 16, 32, 64, ...; ensembles: N·r)"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="share of GPU memory vLLM may use"
    )
    vllm_dtype: str = Field("auto", description="auto, float32, bfloat16, float16")
    vllm_max_model_len: int = Field(2048, ge=16, description="vLLM context length")
    vllm_bank_dir: Path | None = Field(None, description="where bank members are written (default: /dev/shm)")
    api_token: str | None = Field(
        None, description="bearer token for /predict, /feedback and the OpenAI/KServe routes; unset: open"
    )
    admin_token: str | None = Field(
        None,
        description="bearer token for adapter load/unload (else API_TOKEN); none set: loopback clients only",
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v: str | list[str]) -> list[str]:
        return [h.strip().lower() for h in v.split(",") if h.strip()] if isinstance(v, str) else v

    @field_validator("feedback_key", mode="before")
    @classmethod
    def _feedback_key(cls, v: object) -> object:
        # docker-compose passes DALORRA_FEEDBACK_KEY="" when the user's shell has none: that means unset
        return None if v == "" else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={v!r}: one of auto, float32, bfloat16, float16")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("hf", "vllm"):
            raise ValueError(f"backend={v!r}: one of 'hf' (transformers) or 'vllm' (mask bank)")
        return v


def settings_table() -> str:
    """The settings as a markdown table (docs/settings.md is this text; tests/test_settings_doc.py keeps it so)."""
    rows = [
        "# Settings",
        "",
        "Environment variables (prefix `DALORRA_`), read and validated at start by "
        "`server/settings.py`; `dalorra serve --help` lists the flags that override some of them. "
        "Generated by `python -m server.settings`.",
        "",
        "| variable | default | what it does |",
        "|---|---|---|",
    ]
    for name, f in Settings.model_fields.items():
        default = f.default_factory() if f.default_factory is not None else f.default
        if isinstance(default, Path):
            default = default.relative_to(REPO) if default.is_relative_to(REPO) else default
        shown = "unset" if default is None or default == [] else f"`{default}`"
        rows.append(f"| `DALORRA_{name.upper()}` | {shown} | {(f.description or '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
