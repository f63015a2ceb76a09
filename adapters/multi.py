"""Many adapters on one base model: adapter slots, attach/detach, and mixed-adapter batches (DESIGN §5).

A served process holds ONE copy of the base model. Every module any loaded adapter targets is wrapped once in an
`AdapterSlot`; an adapter is only its factors, switch logits and record (a DalorraModel built with `shared=True`,
whose MaskedLoraLinear layers hold A, B, φ but are not installed in the base). Before a forward, the slots are
given a *route*: which adapters' layers apply, and to which rows of the batch,

    y[rows_a] = W x[rows_a] + (α_a / r_a) · B_a diag(z_row) A_a x[rows_a]     for every adapter a in the batch,

so one forward serves rows of several adapters, each row under its own adapter and its own mask — the idea of
PEFT's mixed-batch forward and Punica/S-LoRA's per-row adapter index, on DALorRA's r-wide bottleneck. A slot with
an empty route is the base layer unchanged, so a forward outside any route is the base model, never another
adapter's. Loading an adapter adds its factors (≈ 2 MB for SmolLM2-135M at r = 8 with lm_head) and no copy of the
base; unloading drops them.

Routes are process state on the shared base: callers serialise forwards (the server's scheduler runs one at a
time on one worker thread).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import PromptFormat
    from .layer import MaskedLoraLinear
    from .model import DalorraModel


class AdapterSlot(nn.Module):
    """Wraps one base nn.Linear of the shared base; applies the adapters of its current route."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        # (layer, rows): rows None = every row of the input, a slice = a contiguous block of rows, else an index
        # tensor. Not registered as submodules: the adapters' factors stay out of the base's state dict.
        self.route: list[tuple[MaskedLoraLinear, torch.Tensor | slice | None]] = []

    @property
    def weight(self) -> torch.Tensor:  # HF code reads lm_head.weight (tied embeddings, resizing)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _add(self, out: torch.Tensor, x: torch.Tensor, weight_rows: torch.Tensor | None) -> torch.Tensor:
        for layer, rows in self.route:
            if layer.mask_mode == "off":
                continue
            if rows is None:
                out = out + layer.lora_delta(x, weight_rows).to(out.dtype)
            elif isinstance(
                rows, slice
            ):  # a contiguous block (score_draws groups rows by adapter): views only
                out[rows] += layer.lora_delta(x[rows], weight_rows).to(out.dtype)
            else:  # scattered rows: gather, then add in place (an out-of-place add copies all of `out`)
                out.index_add_(0, rows, layer.lora_delta(x[rows], weight_rows).to(out.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(self.base_layer(x), x, None)

    def forward_rows(self, x: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
        """Only the output rows `weight_rows` (the K answer-letter tokens of lm_head): (R, d_in) → (R, len)."""
        W = self.base_layer.weight[weight_rows]
        b = None if self.base_layer.bias is None else self.base_layer.bias[weight_rows]
        return self._add(F.linear(x, W, b), x, weight_rows)


class SharedBase:
    """The one base model of a process, its tokenizer, and the slots its adapters attach to."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_name: str = ""):
        self.base, self.tokenizer, self.base_name = base, tokenizer, base_name
        self.slots: dict[str, AdapterSlot] = {}
        self.members: list[DalorraModel] = []  # attached adapters

    def slot(self, name: str) -> AdapterSlot:
        """The slot at module `name`, wrapping the base's nn.Linear there on first use."""
        if name in self.slots:
            return self.slots[name]
        parent_name, _, child = name.rpartition(".")
        parent = self.base.get_submodule(parent_name) if parent_name else self.base
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"module {name} of the base model is a {type(linear).__name__}, not nn.Linear")
        slot = AdapterSlot(linear)
        setattr(parent, child, slot)
        self.slots[name] = slot
        return slot

    def register(self, model: DalorraModel) -> None:
        """Called by DalorraModel(shared=self) once its layers exist."""
        self.members.append(model)

    def detach(self, model: DalorraModel) -> None:
        """Forget `model`; a slot no remaining adapter uses gives its module back to the base unwrapped."""
        self.members = [m for m in self.members if m is not model]
        self.clear_routes()
        used = {n for m in self.members for n in m.adapted}
        for name in [n for n in self.slots if n not in used]:
            parent_name, _, child = name.rpartition(".")
            parent = self.base.get_submodule(parent_name) if parent_name else self.base
            setattr(parent, child, self.slots.pop(name).base_layer)

    def clear_routes(self) -> None:
        for s in self.slots.values():
            s.route = []

    @contextmanager
    def routed(self, entries: Sequence[tuple[DalorraModel, torch.Tensor | slice | None]]) -> Iterator[None]:
        """Within the block, adapter model m applies to `rows` of every input (None: all rows)."""
        self.clear_routes()
        try:
            for model, rows in entries:
                for name, layer in model.adapted.items():
                    self.slots[name].route.append((layer, rows))
            yield
        finally:
            self.clear_routes()

    def memory_bytes(self) -> int:
        """Bytes of the base's parameters and buffers (each tensor once)."""
        seen, total = set(), 0
        for t in [*self.base.parameters(), *self.base.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


@dataclass(frozen=True)
class MixedMasks:
    """Row masks of a mixed-adapter batch. Draw d (a global index over the batch's draws) belongs to adapter
    owner[d]; per_adapter[a][module] is an (N_draws, r_a) table whose rows of a's own draws hold its masks (the
    rest are never read)."""

    owner: torch.Tensor  # (N_draws,) adapter index of each draw
    per_adapter: tuple[dict[str, torch.Tensor], ...]


class MixedView:
    """What adapters.scoring.choice_logits needs of a model, for rows of several adapters on one SharedBase.

    All adapters of one view share the prompt mode and answer letters (the scoring path); each request was
    encoded with its own adapter's prompt format before it got here."""

    def __init__(self, shared: SharedBase, models: Sequence[DalorraModel]):
        if not models:
            raise ValueError("a mixed batch needs at least one adapter")
        modes = {(m.fmt.mode, tuple(m.fmt.letters)) for m in models}
        if len(modes) > 1:
            raise ValueError(
                f"adapters of one forward must share the prompt mode and letters; got {sorted(modes)}"
            )
        self.shared, self.models = shared, list(models)
        self.base, self.tokenizer, self.fmt = shared.base, shared.tokenizer, models[0].fmt

    @property
    def decoder(self) -> nn.Module:
        return self.base.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def first_adapted_layer(self) -> int:
        return min(m.first_adapted_layer() for m in self.models)

    @contextmanager
    def row_masks(
        self,
        masks: MixedMasks | None,
        index: torch.Tensor | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Row j of the next input is draw index[j]: it runs under that draw's adapter and mask (as
        DalorraModel.row_masks, with the adapter chosen per row). noise: seeded dropout streams per row."""
        if masks is None or index is None:
            raise ValueError("a mixed batch needs its row masks and the draw of every row")
        owner = masks.owner[index]  # (R,)
        entries, saved = [], []
        for a, model in enumerate(self.models):
            rows = (owner == a).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            every = rows.numel() == owner.numel()
            sub = noise if noise is None or every else (noise[0][rows], noise[1][rows])
            draws = index if every else index[rows]
            for name, layer in model.adapted.items():
                saved.append((layer, layer.mask_mode, layer.row_masks, layer.row_noise))
                layer.mask_mode, layer.row_masks = "rows", masks.per_adapter[a][name][draws]
                layer.row_noise = sub
            if every:
                entries.append((model, None))
            elif int(rows[-1]) - int(rows[0]) + 1 == rows.numel():  # contiguous: a slice gathers nothing
                entries.append((model, slice(int(rows[0]), int(rows[-1]) + 1)))
            else:
                entries.append((model, rows))
        try:
            with self.shared.routed(entries):
                yield
        finally:
            for layer, mode, rm, rn in saved:
                layer.mask_mode, layer.row_masks, layer.row_noise = mode, rm, rn


def mixed_key(fmt: PromptFormat) -> tuple[str, tuple[str, ...]]:
    """Adapters whose prompt formats give the same key can share one forward."""
    return fmt.mode, tuple(fmt.letters)
