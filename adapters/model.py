"""DalorraModel: a causal LM with MaskedLoraLinear layers injected, plus mask drawing and the KL term."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import AdapterConfig, PromptFormat
from .layer import MASK_MODES, MaskedLoraLinear
from .masks import distinct_draws, draw_masks_from, mask_groups
from .multi import AdapterSlot

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .multi import SharedBase

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _wants(name: str, cfg: AdapterConfig) -> bool:
    if not any(name == t or name.endswith("." + t) for t in cfg.targets):
        return False
    m = _LAYER_INDEX.search("." + name + ".")
    if m is None or cfg.layers is None:
        return True
    return int(m.group(1)) in cfg.layers


class DalorraModel(nn.Module):
    """Holds the base model (frozen), its tokenizer, the adapted layers and the adapter's metadata."""

    def __init__(
        self,
        base: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        cfg: AdapterConfig,
        fmt: PromptFormat | None = None,
        base_name: str = "",
        seed: int | None = None,
        shared: SharedBase | None = None,
        lora_dtype: torch.dtype | None = None,
    ):
        """shared: attach to a SharedBase (adapters/multi.py) instead of injecting the layers into `base`: the
        layers then hold only this adapter's factors and apply through the base's slots (many adapters, one
        base). lora_dtype: the factors' dtype (default: the base weights')."""
        super().__init__()
        if shared is not None and shared.base is not base:
            raise ValueError("shared= must be the SharedBase that holds `base`")
        self.shared = shared
        self.base, self.tokenizer, self.cfg = base, tokenizer, cfg
        self.fmt = fmt or PromptFormat()
        self.base_name = base_name
        # Fixed masks, e.g. an ensemble's member blocks: name → (M, r); sample s uses row s mod M.
        self.fixed_masks: dict[str, torch.Tensor] = {}
        if seed is not None:
            torch.manual_seed(seed)  # A's Kaiming init
        targets = [
            n for n, m in base.named_modules() if isinstance(m, nn.Linear | AdapterSlot) and _wants(n, cfg)
        ]
        if not targets:
            raise ValueError(f"no nn.Linear in the base model matches targets {list(cfg.targets)}")
        self.adapted: dict[str, MaskedLoraLinear] = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            current = getattr(parent, child)
            if isinstance(current, AdapterSlot) and shared is None:
                raise ValueError(f"{name} holds other adapters' slot: attach with shared=, do not inject")
            linear = shared.slot(name).base_layer if shared is not None else current
            layer = MaskedLoraLinear(
                linear, cfg.r, cfg.alpha, cfg.p0, cfg.tau, cfg.hard, cfg.dropout, dtype=lora_dtype
            )
            if shared is None:
                setattr(parent, child, layer)
            self.adapted[name] = layer
        if shared is not None:
            shared.register(self)
        for i, name in enumerate(sorted(self.adapted)):  # every module its own dropout noise within a stream
            self.adapted[name].noise_id = i
        # Shared switches: every member of a group holds the group's one φ parameter (the same tensor object).
        self.mask_groups = mask_groups(self.adapted, cfg.mask_sharing)
        for members in self.mask_groups.values():
            for n in members[1:]:
                self.adapted[n].mask_logits = self.adapted[members[0]].mask_logits

    # ---- parameters -------------------------------------------------------------------------------
    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.adapted.values():
            yield layer.lora_A
            yield layer.lora_B

    def mask_parameters(self) -> Iterator[nn.Parameter]:
        for members in self.mask_groups.values():  # a shared φ once
            yield self.adapted[members[0]].mask_logits

    def kl(self) -> torch.Tensor:
        """Σ over switch groups (modules, unless shared) of KL(q(z) || Bernoulli(p0)^r); 0 if not stochastic."""
        if not self.cfg.stochastic:
            return torch.zeros(())
        return torch.stack([self.adapted[m[0]].kl() for m in self.mask_groups.values()]).sum()

    def keep_probabilities(self) -> dict[str, list[float]]:
        """Mean σ(φ) per module kind (q_proj, v_proj, lm_head, …) — the posterior's own evidence."""
        kinds: dict[str, list[float]] = {}
        for name, layer in self.adapted.items():
            kinds.setdefault(name.rsplit(".", 1)[-1], []).extend(layer.keep_prob.detach().tolist())
        return kinds

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def decoder(self) -> nn.Module:
        return self.base.get_decoder()

    # ---- masks ------------------------------------------------------------------------------------
    def set_mask_mode(self, mode: str) -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; one of {MASK_MODES}")
        for layer in self.adapted.values():
            layer.mask_mode, layer.row_masks = mode, None

    def draw_masks(self, samples: int, seed: int, first: int = 0) -> dict[str, torch.Tensor]:
        """Hard masks z_first..z_{first+S-1} per module, z_s ~ Bernoulli(σ(φ)) from (seed, s): name → (S, r)."""
        ranks = {n: lay.r for n, lay in self.adapted.items()}
        keep = {n: lay.keep_prob for n, lay in self.adapted.items()} if self.cfg.stochastic else None
        drawn = draw_masks_from(
            ranks, keep, self.fixed_masks, samples, seed, first, sharing=self.cfg.mask_sharing
        )
        return {n: m.to(self.adapted[n].lora_A) for n, m in drawn.items()}

    def first_adapted_layer(self) -> int:
        """Index of the lowest decoder layer with an adapter (num layers if only lm_head is adapted).
        Layers below it are identical under every mask: scoring runs them once per question (top-L path)."""
        idx = [int(m.group(1)) for n in self.adapted if (m := _LAYER_INDEX.search("." + n + ".")) is not None]
        if len(idx) != sum(1 for n in self.adapted if n != "lm_head" and not n.endswith(".lm_head")):
            return 0  # an adapted module outside the decoder layers (other than lm_head): no shared prefix
        return min(idx) if idx else len(self.decoder.layers)

    def distinct_draws(self) -> int | None:
        """Distinct predictions this adapter's draws can give (masks.distinct_draws); None: every draw is new."""
        return distinct_draws(self.cfg.method, self.cfg.stochastic, self.fixed_masks)

    def concrete_masks(self, rows: int) -> dict[str, torch.Tensor]:
        """Training: one relaxed (straight-through) mask per row and module, differentiable in φ."""
        if not self.cfg.stochastic:
            return {n: torch.ones(rows, lay.r, device=lay.lora_A.device) for n, lay in self.adapted.items()}
        out = {}
        for members in self.mask_groups.values():  # one draw per group, shared by its members
            z = self.adapted[members[0]].concrete_mask(rows)
            out.update({n: z for n in members})
        return out

    @contextmanager
    def row_masks(
        self,
        masks: dict[str, torch.Tensor] | None,
        index: torch.Tensor | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Within the block, row i of every batch uses masks[name][index[i]] (None masks: all on).

        noise: (keys, pos), seeded dropout for every token of the next input (MaskedLoraLinear.row_noise)."""
        prev = {n: (lay.mask_mode, lay.row_masks, lay.row_noise) for n, lay in self.adapted.items()}
        try:
            for name, layer in self.adapted.items():
                if masks is None:
                    layer.mask_mode, layer.row_masks = "all", None
                else:
                    m = masks[name]
                    layer.mask_mode, layer.row_masks = "rows", (m if index is None else m[index])
                layer.row_noise = noise
            if self.shared is None:
                yield
            else:  # the base's slots apply this adapter, on every row, within the block
                with self.shared.routed([(self, None)]):
                    yield
        finally:
            for name, layer in self.adapted.items():
                layer.mask_mode, layer.row_masks, layer.row_noise = prev[name]

    @contextmanager
    def mc_dropout(self, enabled: bool) -> Iterator[None]:
        """MC dropout keeps the LoRA input dropout active at test time, drawing from the global RNG (generation).
        Scoring seeds it per row instead (row_masks(..., noise=...); adapters/scoring.py)."""
        drops = [layer.dropout for layer in self.adapted.values() if isinstance(layer.dropout, nn.Dropout)]
        prev = [d.training for d in drops]
        try:
            for d in drops:
                d.train(enabled)
            yield
        finally:
            for d, p in zip(drops, prev, strict=True):
                d.train(p)
