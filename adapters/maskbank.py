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
from safetensors.torch import save_file

from .adapter_io import read_adapter
from .masks import distinct_draws, draw_masks_from


class BankSource:
    """One adapter directory (adapter_io.read_adapter) as the mask bank needs it (no base model needed)."""

    def __init__(self, adapter_dir: str | os.PathLike):
        self.files = files = read_adapter(adapter_dir)
        self.record = files.record
        self.ranks = {n: int(A.shape[0]) for n, (A, _) in files.factors.items()}
        self.stochastic = files.config.stochastic
        self.keep = (
            {n: torch.sigmoid(phi) for n, phi in files.mask_logits.items()} if self.stochastic else None
        )
        self.fixed = files.fixed_masks
        self.sharing = files.config.mask_sharing

    def distinct(self) -> int | None:
        """Distinct predictions the adapter can give (as DalorraModel.distinct_draws); None: unbounded.
        MC dropout is None too: dropout on activations has no weight-space equivalent (the bank refuses it)."""
        return distinct_draws(self.files.config.method, self.stochastic, self.fixed)

    def draw(self, members: int, seed: int) -> dict[str, torch.Tensor]:
        return draw_masks_from(self.ranks, self.keep, self.fixed, members, seed, sharing=self.sharing)

    def write_member(self, masks: dict[str, torch.Tensor], index: int, out_dir: str | os.PathLike) -> Path:
        """Write bank member `index` (rows of A zeroed where masks[name][index] == 0) as a PEFT adapter, atomically."""
        out = Path(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            weights = {}
            for name, (A, B) in self.files.factors.items():
                weights[f"base_model.model.{name}.lora_A.weight"] = (
                    A * masks[name][index][:, None].to(A.dtype)
                ).contiguous()
                weights[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
            save_file(weights, str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(self.files.peft_config, indent=2))
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out
