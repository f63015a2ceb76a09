import json

import numpy as np
import pytest
import torch

from adapters.adapter_io import AdapterError, load_adapter, save_adapter
from adapters.config import AdapterConfig, PromptFormat
from adapters.data import DataError, load_jsonl
from adapters.model import DalorraModel
from adapters.scoring import score
from tests.conftest import make_tiny, randomize_lora
from tests.test_scoring import MIXED


def _saved(tmp_path, tokenizer, mode="cloze"):
    model = DalorraModel(
        make_tiny(), tokenizer, AdapterConfig(p0=0.7), PromptFormat(mode=mode), seed=0, base_name="tiny"
    )
    randomize_lora(model, std=0.3)
    out = save_adapter(model, tmp_path / "ad", extra={"training": {"steps": 0}})
    return model, out


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_round_trip_identical_predictions(tmp_path, tokenizer, mode):
    model, out = _saved(tmp_path, tokenizer, mode)
    loaded = load_adapter(out, make_tiny(), tokenizer)
    assert loaded.fmt == model.fmt and loaded.cfg == model.cfg
    want = {k: v for k, v in model.state_dict().items() if "lora" in k or "phi" in k}
    got = loaded.state_dict()
    assert want and all(torch.equal(v, got[k]) for k, v in want.items())  # the adapter's tensors, bit for bit
    # the same predictions; CPU kernels may sum in another order under load (seen: 1.2e-5 apart), not more
    np.testing.assert_allclose(
        score(model, MIXED, samples=5, seed=3), score(loaded, MIXED, samples=5, seed=3), rtol=0, atol=1e-4
    )
    rec = json.loads((out / "dalorra.json").read_text())
    assert rec["method"] == "dalorra" and rec["adapter"]["p0"] == 0.7 and rec["training"] == {"steps": 0}
    assert rec["base_model"]["config_hash"]


def test_peft_loads_the_directory(tmp_path, tokenizer):
    from peft import PeftModel

    model, out = _saved(tmp_path, tokenizer)
    peft = PeftModel.from_pretrained(make_tiny(), str(out))
    ids = torch.randint(0, 49152, (2, 9))
    model.set_mask_mode("mean")  # PEFT gets the mean-mask network B·diag(σ(φ))·A: the deterministic answer
    torch.testing.assert_close(
        peft(input_ids=ids).logits, model.base(input_ids=ids).logits, atol=1e-5, rtol=0
    )
    model.set_mask_mode("all")  # …which is not the all-on network (keep-probabilities < 1)
    assert not torch.allclose(peft(input_ids=ids).logits, model.base(input_ids=ids).logits, atol=1e-4)


def test_raw_factors_survive_the_mean_network_export(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model, out = _saved(tmp_path, tokenizer)
    raw = load_file(str(out / "dalorra_masks.safetensors"))
    peft_file = load_file(str(out / "adapter_model.safetensors"))
    name = "lm_head"
    layer = model.adapted[name]
    torch.testing.assert_close(raw[f"{name}.lora_B"], layer.lora_B.detach())
    torch.testing.assert_close(
        peft_file[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.detach() * layer.keep_prob.detach()
    )
    loaded = load_adapter(out, make_tiny(), tokenizer)  # the raw factors, not the mean network, come back
    torch.testing.assert_close(loaded.adapted[name].lora_B.detach(), layer.lora_B.detach())


def test_merge_and_unload_with_tied_embeddings_needs_untying_first(tmp_path, tokenizer):
    """SmolLM2 ties lm_head to the input embeddings: merging an lm_head LoRA into the shared matrix changes the
    embeddings too. Untied first (the README's recipe), the merged model equals the adapter's mean network."""
    from peft import PeftModel

    model, out = _saved(tmp_path, tokenizer)
    ids = torch.randint(0, 49152, (2, 9))
    model.set_mask_mode("mean")
    want = model.base(input_ids=ids).logits
    tied = PeftModel.from_pretrained(make_tiny(), str(out)).merge_and_unload()
    assert not torch.allclose(tied(input_ids=ids).logits, want, atol=1e-4)  # the pitfall is real
    base = make_tiny()
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def _mean_network_logits(model, ids):
    model.set_mask_mode("mean")
    return model.base(input_ids=ids).logits


def test_auto_peft_merge_equals_the_mean_network(tmp_path, tokenizer, tiny_dir, monkeypatch):
    """A tied base whose lm_head is adapted: adapter_config.json names an untied view of the base, so
    AutoPeftModelForCausalLM loads with no other argument and merge_and_unload changes lm_head alone."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DALORRA_CACHE", str(tmp_path / "cache"))
    model = DalorraModel(
        make_tiny(seed=1),
        tokenizer,
        AdapterConfig(p0=0.7),
        PromptFormat(mode="cloze"),
        base_name=str(tiny_dir),
    )
    randomize_lora(model, std=0.3)
    out = save_adapter(model, tmp_path / "ad")
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path.startswith(str(tmp_path / "cache" / "models" / "untied"))
    view, info = AutoModelForCausalLM.from_pretrained(base_path, output_loading_info=True)
    assert not info["missing_keys"] and not view.config.tie_word_embeddings
    assert view.lm_head.weight.data_ptr() != view.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 49152, (2, 9))
    torch.testing.assert_close(
        view(input_ids=ids).logits, make_tiny(seed=1)(input_ids=ids).logits
    )  # same model

    want = _mean_network_logits(model, ids)
    peft = AutoPeftModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(peft(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    merged = peft.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.model.embed_tokens.weight, make_tiny(seed=1).model.embed_tokens.weight)
    assert load_adapter(out, make_tiny(seed=1), tokenizer).base_name == str(
        tiny_dir
    )  # dalorra.json: the name


def test_an_adapter_on_a_shared_base_names_the_untied_view_too(tmp_path, tokenizer, tiny_dir, monkeypatch):
    """Attached to a SharedBase (many adapters, one base), lm_head is the base's slot, not the adapter's layer."""
    from adapters.multi import SharedBase

    monkeypatch.setenv("DALORRA_CACHE", str(tmp_path / "cache"))
    shared = SharedBase(make_tiny(seed=1), tokenizer)
    model = DalorraModel(shared.base, tokenizer, AdapterConfig(), base_name=str(tiny_dir), shared=shared)
    out = save_adapter(model, tmp_path / "ad")
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path.startswith(str(tmp_path / "cache" / "models" / "untied"))


@pytest.mark.parametrize(
    "targets,base_name,want",
    [
        (("q_proj", "v_proj"), "DIR", "DIR"),  # lm_head not adapted: the base itself, nothing to untie
        (("q_proj", "v_proj", "lm_head"), "some-org/some-model", "some-org/some-model"),  # a hub id, as given
        (("q_proj", "v_proj", "lm_head"), "OTHER", "OTHER"),  # a directory with another architecture
    ],
)
def test_base_path_without_an_untied_view(
    tmp_path, tokenizer, tiny_dir, monkeypatch, targets, base_name, want
):
    from transformers import LlamaConfig

    monkeypatch.setenv("DALORRA_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    LlamaConfig(vocab_size=49152, hidden_size=64, num_attention_heads=4).save_pretrained(other)
    names = {"DIR": str(tiny_dir.resolve()), "OTHER": str(other)}
    model = DalorraModel(
        make_tiny(seed=1),
        tokenizer,
        AdapterConfig(targets=targets),
        base_name=names.get(base_name, base_name),
    )
    out = save_adapter(model, tmp_path / "ad")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == names.get(
        want, want
    )
    assert not (tmp_path / "cache" / "models" / "untied").exists()


@pytest.mark.smollm
def test_auto_peft_loads_an_adapter_of_the_embedded_base(tmp_path, smollm, smollm_path, monkeypatch):
    """`embedded:SmolLM2-135M-Instruct` is no path from_pretrained can read: the adapter names the converted cache
    (untied), and `python -m adapters.peft_export DIR` points an adapter from another machine at this one's."""
    from peft import AutoPeftModelForCausalLM

    from adapters.basemodel import EMBEDDED_NAME, converted_dir
    from adapters.peft_export import relink

    monkeypatch.setenv("DALORRA_CACHE", str(tmp_path / "cache"))  # the untied view goes here, not in ~/.cache
    converted_dir().parent.mkdir(parents=True)
    converted_dir().symlink_to(smollm_path)
    base, tok = smollm
    model = DalorraModel(
        base, tok, AdapterConfig(), PromptFormat(mode="cloze"), base_name=EMBEDDED_NAME, seed=0
    )
    randomize_lora(model, std=0.02)
    out = save_adapter(model, tmp_path / "ad")
    cfg_file = out / "adapter_config.json"
    view = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    assert view.startswith(str(tmp_path / "cache" / "models" / "untied" / "SmolLM2-135M-Instruct-f32-"))
    cfg_file.write_text(cfg_file.read_text().replace(view, EMBEDDED_NAME))  # as written on another machine
    assert relink(out) == view and json.loads(cfg_file.read_text())["base_model_name_or_path"] == view
    ids = tok(["Which of these is a source of light? The Sun"], return_tensors="pt").input_ids
    want = _mean_network_logits(model, ids)
    merged = AutoPeftModelForCausalLM.from_pretrained(str(out)).merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=0)


def test_plain_peft_adapter_loads_with_all_masks_on(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(make_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "plain")
    loaded = load_adapter(tmp_path / "plain", make_tiny(), tokenizer)
    assert loaded.cfg.stochastic is False and loaded.cfg.r == 4
    s = score(loaded, MIXED, samples=3, seed=0)
    assert s.shape[0] == 1  # all masks on: every sample would be the same, so one is scored
    ids = torch.randint(0, 49152, (2, 9))
    loaded.set_mask_mode("all")
    torch.testing.assert_close(
        peft(input_ids=ids).logits, loaded.base(input_ids=ids).logits, atol=1e-5, rtol=0
    )


def test_mismatched_base_model_refused(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, out = _saved(tmp_path, tokenizer)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(AdapterError, match="config hash"):
        load_adapter(out, other, tokenizer)


def test_truncated_adapter_refused(tmp_path, tokenizer):
    _, out = _saved(tmp_path, tokenizer)
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(out, make_tiny(), tokenizer)


@pytest.mark.parametrize(
    "row,match",
    [
        ('{"question": "q", "choices": ["a", "b"], "label": 5}', "label 5"),
        ('{"question": "q", "choices": ["a"], "label": 0}', "1 choices"),
        ('{"question": "", "choices": ["a", "b"], "label": 0}', "question"),
        ('{"choices": ["a", "b"], "label": 0}', "missing"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, match):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "ok", "choices": ["a", "b"], "label": 1}\n' + row + "\n")
    with pytest.raises(DataError, match=match) as exc:
        load_jsonl(p)
    assert f"{p}:2" in str(exc.value)


def test_empty_file_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no items"):
        load_jsonl(tmp_path / "e.jsonl")
