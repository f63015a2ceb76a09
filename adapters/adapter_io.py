"""Adapter directories: PEFT-readable LoRA files plus DALorRA's mask logits and a JSON record.

    adapter_config.json          PEFT LoraConfig (exact module names as target_modules; a loadable base path,
                                 untied when lm_head is adapted on a tied base: peft_export.py)
    adapter_model.safetensors    base_model.model.<module>.lora_{A,B}.weight as PEFT reads it: for a stochastic
                                 adapter the mean-mask network B·diag(σ(φ))·A (what a deterministic answer serves),
                                 otherwise the factors as trained
    dalorra_masks.safetensors    <module>.mask_logits (r,); for a stochastic adapter the raw factors
                                 <module>.lora_A / <module>.lora_B (format 2); for ensembles <module>.fixed_masks (M, r)
    dalorra.json                 method, adapter config, prompt format, answer tokens, base model + config
                                 hash, training summary, calibration record
Directories are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written adapter that loads. `read_adapter` is the one reader: it checks a directory and returns it as plain
data, from which `load_adapter` builds a DalorraModel (HF backend) and maskbank.BankSource a mask bank (vLLM).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .basemodel import config_hash, resolve_name
from .config import AdapterConfig, PromptFormat
from .masks import mask_groups
from .model import DalorraModel
from .peft_export import peft_base_path
from .scoring import letter_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .multi import SharedBase

FORMAT_VERSION = 2  # 2: adapter_model.safetensors holds the mean-mask network, raw factors in MASKS
RECORD = "dalorra.json"
MASKS = "dalorra_masks.safetensors"


class AdapterError(ValueError):
    """An adapter directory is missing, corrupt, or does not fit the base model."""


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def save_adapter(
    model: DalorraModel,
    out_dir: str | os.PathLike,
    extra: dict | None = None,
    files: dict[str, dict] | None = None,
) -> Path:
    """Write the adapter directory atomically: everything goes into a temporary sibling that replaces `out_dir`
    in one rename. `extra` is merged into dalorra.json; `files` are more JSON files written beside it."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = model.cfg
        peft_cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": sorted(model.adapted),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "modules_to_save": None,
            # a path from_pretrained can load, untied when the adapter changes a tied lm_head (peft_export.py)
            "base_model_name_or_path": peft_base_path(model),
        }
        (tmp / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
        weights, masks = {}, {}
        for name, layer in model.adapted.items():
            A, B = layer.lora_A.detach().cpu().contiguous(), layer.lora_B.detach().cpu().contiguous()
            weights[f"base_model.model.{name}.lora_A.weight"] = A
            if cfg.stochastic:  # PEFT gets the mean network B·diag(π)·A; the masks file keeps the raw factors
                weights[f"base_model.model.{name}.lora_B.weight"] = (
                    B * layer.keep_prob.detach().cpu()
                ).contiguous()
                masks[f"{name}.lora_A"], masks[f"{name}.lora_B"] = A.clone(), B.clone()
            else:
                weights[f"base_model.model.{name}.lora_B.weight"] = B
            masks[f"{name}.mask_logits"] = layer.mask_logits.detach().cpu().clone()  # shared φ: one copy each
            if name in model.fixed_masks:
                masks[f"{name}.fixed_masks"] = model.fixed_masks[name].cpu().contiguous()
        save_file(weights, str(tmp / "adapter_model.safetensors"))
        save_file(masks, str(tmp / MASKS))
        record = {
            "format_version": FORMAT_VERSION,
            "method": cfg.method,
            "adapter": cfg.to_dict(),
            "prompt": model.fmt.to_dict(),
            "answer_tokens": letter_token_ids(model.tokenizer, model.fmt, len(model.fmt.letters))
            if model.fmt.mode == "letter"
            else None,
            "base_model": {"name": model.base_name, "config_hash": config_hash(model.base.config)},
            "keep_probability": {k: float(sum(v) / len(v)) for k, v in model.keep_probabilities().items()},
            **(extra or {}),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=float))
        for name, content in (files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, default=float))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_record(adapter_dir: str | os.PathLike) -> dict:
    """The adapter's JSON record; for a plain PEFT LoRA, one synthesised from adapter_config.json."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise AdapterError(f"{d}: not an adapter directory (no adapter_config.json)")
    try:
        if (d / RECORD).is_file():
            return json.loads((d / RECORD).read_text())
        peft = json.loads((d / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{d}: corrupt JSON ({exc})") from None
    if peft.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{d}: peft_type {peft.get('peft_type')!r} is not LORA")
    targets = peft.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return {
        "format_version": 0,
        "method": "lora",
        "plain_peft": True,
        "adapter": {
            "method": "lora",
            "r": int(peft["r"]),
            "alpha": float(peft.get("lora_alpha", peft["r"])),
            "targets": list(targets),
            "stochastic": False,
        },
        "prompt": PromptFormat().to_dict(),
        "base_model": {"name": peft.get("base_model_name_or_path") or "", "config_hash": None},
    }


def _read_peft_config(d: Path, cfg: AdapterConfig) -> dict:
    """adapter_config.json is what PEFT reads: it must parse and agree with the adapter that will serve."""
    try:
        peft = json.loads((d / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{d}: adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(peft, dict):
        raise AdapterError(f"{d}: adapter_config.json must be a JSON object")
    if peft.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{d}: adapter_config.json peft_type {peft.get('peft_type')!r} is not LORA")
    if "r" in peft and peft["r"] != cfg.r:
        raise AdapterError(f"{d}: adapter_config.json says r={peft['r']!r}, but the adapter has rank {cfg.r}")
    return peft


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory as plain data, read and checked once (no base model needed)."""

    path: Path
    record: dict  # dalorra.json, or one synthesised from adapter_config.json for a plain PEFT LoRA
    config: AdapterConfig
    fmt: PromptFormat
    peft_config: dict  # adapter_config.json as written (mask-bank members reuse it)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A (r, d_in), B (d_out, r)) as trained
    mask_logits: dict[str, torch.Tensor]  # module → φ (r,); every module of a stochastic adapter has one
    fixed_masks: dict[str, torch.Tensor]  # module → (M, r) member blocks (ensembles)
    temperature: float  # the fitted temperature; 1 when none was fitted

    def check_base(self, have_hash: str, served: str) -> None:
        """Refuse a base model other than the one the adapter was trained on (by config hash)."""
        want = self.record.get("base_model", {}).get("config_hash")
        if want and want != have_hash:
            raise AdapterError(
                f"{self.path}: adapter was trained on base model {self.record['base_model'].get('name')!r} (config "
                f"hash {want}), but the base model served is {served!r} with config hash {have_hash}. "
                "Load the matching base model (--base-model) or retrain the adapter."
            )


def read_adapter(adapter_dir: str | os.PathLike) -> AdapterFiles:
    """Read and check an adapter directory: record, configs, the trained factors (format 2: the raw ones from
    dalorra_masks.safetensors, not PEFT's mean network), φ, fixed masks and temperature. Raises AdapterError."""
    d = Path(adapter_dir)
    rec = read_record(d)
    try:
        cfg = AdapterConfig.from_dict(rec["adapter"])
        fmt = PromptFormat.from_dict(rec["prompt"])
        weights = load_file(str(d / "adapter_model.safetensors"))
        masks = load_file(str(d / MASKS)) if (d / MASKS).is_file() else {}
    except Exception as exc:  # safetensors raises several types on a truncated file
        raise AdapterError(f"{d}: cannot read adapter files ({type(exc).__name__}: {exc})") from None
    peft = _read_peft_config(d, cfg)
    state = {k.replace(".default", ""): v for k, v in weights.items()}
    factors = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        if f"{name}.lora_A" in masks and f"{name}.lora_B" in masks:  # format 2: the raw factors
            factors[name] = (masks[f"{name}.lora_A"], masks[f"{name}.lora_B"])
        elif key.replace(".lora_A.", ".lora_B.") in state:
            factors[name] = (state[key], state[key.replace(".lora_A.", ".lora_B.")])
        else:
            raise AdapterError(f"{d}: module {name} has lora_A but no lora_B weights")
    if not factors:
        raise AdapterError(f"{d}: no LoRA weights in adapter_model.safetensors")
    phi = {n: masks[f"{n}.mask_logits"] for n in factors if f"{n}.mask_logits" in masks}
    fixed = {n: masks[f"{n}.fixed_masks"] for n in factors if f"{n}.fixed_masks" in masks}
    for name, (A, B) in factors.items():
        for what, t in (
            ("lora_A", A),
            ("lora_B", B),
            ("mask_logits", phi.get(name)),
            ("fixed_masks", fixed.get(name)),
        ):
            if t is not None and not bool(torch.isfinite(t).all()):  # NaN/inf would answer null probabilities
                raise AdapterError(f"{d}: {name}.{what} holds NaN or infinite values")
    if cfg.stochastic and len(phi) < len(factors):
        raise AdapterError(f"{d}: a stochastic adapter without mask logits for every module")
    for members in mask_groups(phi, cfg.mask_sharing).values():  # a shared φ is saved once per member
        if any(not torch.equal(phi[n], phi[members[0]]) for n in members[1:]):
            raise AdapterError(
                f"{d}: modules {members[0]} … {members[-1]} share one switch "
                f"({cfg.mask_sharing!r} sharing) but their saved mask logits differ"
            )
    t = rec.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise AdapterError(f"{d}: temperature {t!r} in {RECORD} must be a positive number (or absent: 1)")
    return AdapterFiles(d, rec, cfg, fmt, peft, factors, phi, fixed, float(t))


def load_adapter(
    adapter_dir: str | os.PathLike,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base_name: str = "",
    shared: SharedBase | None = None,
    lora_dtype: torch.dtype | None = None,
) -> DalorraModel:
    """Inject the adapter into `base` (which it modifies) and return the DalorraModel; with `shared` (the
    SharedBase holding `base`), attach it to the base's slots instead, beside other adapters (adapters/multi.py).

    Refuses with AdapterError when the adapter was trained for a different base architecture.
    """
    files = read_adapter(adapter_dir)
    files.check_base(config_hash(base.config), resolve_name(base_name))
    d, cfg = files.path, files.config
    model = DalorraModel(
        base,
        tokenizer,
        cfg,
        files.fmt,
        base_name=base_name or files.record["base_model"].get("name", ""),
        shared=shared,
        lora_dtype=lora_dtype,
    )
    for name, layer in model.adapted.items():
        if name not in files.factors:
            raise AdapterError(f"{d}: no weights for module {name}")
        A, B = files.factors[name]
        if A.shape != layer.lora_A.shape or B.shape != layer.lora_B.shape:
            raise AdapterError(
                f"{d}: {name} has shapes {tuple(A.shape)}/{tuple(B.shape)}, expected "
                f"{tuple(layer.lora_A.shape)}/{tuple(layer.lora_B.shape)}"
            )
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            if name in files.mask_logits:
                layer.mask_logits.copy_(files.mask_logits[name])
        if name in files.fixed_masks:
            model.fixed_masks[name] = files.fixed_masks[name]
    model.record = files.record
    return model
