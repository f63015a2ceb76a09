"""Shared fixtures: a tiny random Llama (unit tests) and the real embedded SmolLM2 (integration tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The server's default dtype is `auto` (bf16 on CPUs with AVX512-BF16); tests that compare the server with offline
# float32 scoring pin float32, and tests of bf16 ask for it explicitly.
os.environ.setdefault("DALORRA_DTYPE", "float32")
# The integration tests read the benchmark JSONL files (README, "Datasets"); the development machines keep them in
# a `shared/datasets` folder beside the checkout, used when DALORRA_DATA_DIR does not say otherwise.
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if _BESIDE.is_dir():
    os.environ.setdefault("DALORRA_DATA_DIR", str(_BESIDE))

from adapters.data import default_data_dir  # noqa: E402

DATA = default_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA / "arc_easy" / "validation.jsonl").is_file(), f"datasets not found at {DATA}"
    return DATA


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """Directory of the converted embedded model (converts once per machine)."""
    from adapters.basemodel import local_path

    return local_path(None)


@pytest.fixture
def smollm(smollm_path):
    """A fresh (base, tokenizer) pair of the real SmolLM2; each test may inject its own adapter."""
    from adapters.basemodel import load_base

    return load_base(None)


@pytest.fixture(scope="session")
def tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


def make_tiny(seed: int = 0, vocab: int = 49152):
    """A 2-layer random Llama with SmolLM2's vocabulary, so the real tokenizer drives it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def tiny():
    return make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """The tiny model saved to disk with the real tokenizer: a base model the trainer can load by path."""
    d = tmp_path_factory.mktemp("tiny")
    make_tiny(seed=1).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def randomize_lora(model, seed: int = 0, std: float = 0.05):
    """Give B non-zero values (B = 0 at init would make every mask look identical)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapted.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
            layer.mask_logits.copy_(torch.randn(layer.r, generator=g))


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, smollm_path):
    """An adapters directory with a DALorRA adapter on the real SmolLM2 (random, small B) and a corrupt one."""
    from adapters.adapter_io import save_adapter
    from adapters.basemodel import load_base
    from adapters.config import AdapterConfig, PromptFormat
    from adapters.model import DalorraModel
    from adapters.shift import Reference

    d = tmp_path_factory.mktemp("adapters")
    base, tok = load_base(None)
    model = DalorraModel(base, tok, AdapterConfig(), PromptFormat(mode="cloze"), seed=0)
    randomize_lora(model, std=0.01)
    rng = np.random.default_rng(0)
    decision = {
        "confidence": {"valid": True, "threshold": 0.5},
        "epistemic": {"valid": False},
        "conformal": {"valid": True, "qhat": 0.8},
        # a calibration reference (made-up scores): requests get unfamiliarity and the adapter a shift monitor
        "reference": Reference(rng.uniform(0, 0.01, 100), rng.uniform(0.5, 1.0, 100)).to_record(),
    }
    save_adapter(model, d / "test-ad", extra={"default_samples": 4, "decision": decision})
    (d / "corrupt").mkdir()
    (d / "corrupt" / "adapter_config.json").write_text("{not json")
    return d
