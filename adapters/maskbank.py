"""The "mask bank": M pre-masked copies of one adapter as ordinary PEFT LoRAs.

A DALorRA adapter under a hard mask z is an ordinary LoRA whose rank components with z_k = 0 are gone:
(alpha/r) B diag(z) A = (alpha/r) B (diag(z) A), i.e. zero the masked rows of A. Engines that batch many
LoRAs (vLLM) cannot apply a per-request mask, but they can serve M such copies at once.

The draw itself lives in adapters/masks.py (`draw_masks_from`), shared with DalorraModel.draw_masks, so the bank
and the HF backend give the same z_1..z_M for the same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .masks import draw_masks_from


class BankSource:
    """One adapter directory's LoRA weights and mask parameters, read once (no base model needed)."""

    def __init__(self, adapter_dir: str | os.PathLike):
        from .adapter_io import MASKS, AdapterError, read_record

        self.dir = Path(adapter_dir)
        self.record = read_record(self.dir)
        try:
            self.peft_config = json.loads((self.dir / "adapter_config.json").read_text())
            self.weights = load_file(str(self.dir / "adapter_model.safetensors"))
            masks = load_file(str(self.dir / MASKS)) if (self.dir / MASKS).is_file() else {}
        except Exception as exc:  # safetensors raises several types on a truncated file
            raise AdapterError(f"{self.dir}: cannot read adapter files ({type(exc).__name__}: {exc})") from None
        self.a_keys = {k[: -len(".lora_A.weight")].removeprefix("base_model.model.").replace(".default", ""): k
                       for k in self.weights if k.endswith(".lora_A.weight")}
        if not self.a_keys:
            raise AdapterError(f"{self.dir}: no LoRA weights in adapter_model.safetensors")
        for n, k in self.a_keys.items():  # format 2: PEFT's file holds the mean network; the bank masks the raw factors
            if f"{n}.lora_A" in masks and f"{n}.lora_B" in masks:
                self.weights[k] = masks[f"{n}.lora_A"]
                self.weights[k.replace(".lora_A.", ".lora_B.")] = masks[f"{n}.lora_B"]
        self.ranks = {n: int(self.weights[k].shape[0]) for n, k in self.a_keys.items()}
        self.stochastic = bool(self.record.get("adapter", {}).get("stochastic", False))
        self.keep = ({n: torch.sigmoid(masks[f"{n}.mask_logits"]) for n in self.ranks}
                     if self.stochastic and all(f"{n}.mask_logits" in masks for n in self.ranks) else None)
        if self.stochastic and self.keep is None:
            raise AdapterError(f"{self.dir}: a stochastic adapter without mask logits for every module")
        self.fixed = {n: masks[f"{n}.fixed_masks"] for n in self.ranks if f"{n}.fixed_masks" in masks}
        self.sharing = self.record.get("adapter", {}).get("mask_sharing", "module")

    def distinct(self) -> int | None:
        """Distinct predictions the adapter can give (as DalorraModel.distinct_draws); None: unbounded."""
        if self.record.get("method") == "mcdropout":
            return None  # dropout on activations has no weight-space equivalent: refused by the bank
        if self.fixed:
            return max(int(b.shape[0]) for b in self.fixed.values())
        return None if self.keep is not None else 1

    def draw(self, members: int, seed: int) -> dict[str, torch.Tensor]:
        return draw_masks_from(self.ranks, self.keep, self.fixed, members, seed, sharing=self.sharing)

    def write_member(self, masks: dict[str, torch.Tensor], index: int, out_dir: str | os.PathLike) -> Path:
        """Write bank member `index` (rows of A zeroed where masks[name][index] == 0) as a PEFT adapter, atomically."""
        out = Path(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            weights = dict(self.weights)
            for name, key in self.a_keys.items():
                weights[key] = (self.weights[key] * masks[name][index][:, None].to(self.weights[key].dtype)).contiguous()
            save_file(weights, str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(self.peft_config, indent=2))
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out
