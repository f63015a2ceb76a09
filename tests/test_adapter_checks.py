"""Issue "Safe by default" D6: load_adapter refuses NaN/inf tensors and an adapter_config.json that does not
parse or does not match the adapter (tiny random Llama; the real tokenizer)."""

import json

import pytest
from safetensors.torch import load_file, save_file

from adapters.adapter_io import MASKS, AdapterError, load_adapter, save_adapter
from adapters.config import AdapterConfig, PromptFormat
from adapters.model import DalorraModel
from tests.conftest import make_tiny, randomize_lora


def _saved(tmp_path, tokenizer):
    model = DalorraModel(
        make_tiny(), tokenizer, AdapterConfig(), PromptFormat(mode="cloze"), seed=0, base_name="tiny"
    )
    randomize_lora(model)
    return save_adapter(model, tmp_path / "ad")


def _poison(path, key_part):
    t = load_file(str(path))
    key = next(k for k in t if key_part in k)
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")
    save_file(t, str(path))


@pytest.mark.parametrize(
    "file,key", [("adapter_model.safetensors", "lora_B"), (MASKS, "mask_logits"), (MASKS, "lora_A")]
)
def test_non_finite_tensors_are_refused(tmp_path, tokenizer, file, key):
    out = _saved(tmp_path, tokenizer)
    load_adapter(out, make_tiny(), tokenizer)  # the clean one loads
    _poison(out / file, key)
    if file != MASKS and key == "lora_B":  # format 2 serves the raw factors: poison those too
        _poison(out / MASKS, "lora_B")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_adapter(out, make_tiny(), tokenizer)


@pytest.mark.parametrize(
    "text,match", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), (None, "r=4")]
)
def test_adapter_config_json_is_read_and_checked(tmp_path, tokenizer, text, match):
    out = _saved(tmp_path, tokenizer)
    cfg = out / "adapter_config.json"
    if text is None:  # parses, but disagrees with the tensors' rank
        text = json.dumps({**json.loads(cfg.read_text()), "r": 4})
    cfg.write_text(text)
    with pytest.raises(AdapterError, match=match):
        load_adapter(out, make_tiny(), tokenizer)
