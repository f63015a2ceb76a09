"""The DALorRA layer: a LoRA update whose r rank components each carry a Bernoulli switch (DESIGN §1).

    y = W x + (alpha / r) · B diag(z) A x,   z_j ~ q(z_j) = Bernoulli(σ(φ_j))

The layer wraps the base `nn.Linear` (as PEFT's LoRA layer does) and reads its mask from `self.mask_mode`:

    "off"     LoRA disabled (the base model)
    "all"     z = 1 (plain LoRA; equals PEFT on the same A, B)
    "mean"    z = σ(φ) (deterministic expectation)
    "rows"    z = self.row_masks, one (r,) mask per batch row: row i of the batch uses mask sample s(i)
    "concrete" training: a fresh binary-Concrete draw per row (hard straight-through if `hard`)

LoRA input dropout is nn.Dropout (training; global RNG) unless `row_noise` is set: then each token's dropout mask
comes from its own seeded stream (MC dropout at test time, reproducible whatever else shares the batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

from .masks import stream_seed

MASK_MODES = ("off", "all", "mean", "rows", "concrete")


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly 1[z̃ > 0.5]; backward: the gradient of z̃ (hard + soft − soft.detach() is not exact)."""

    @staticmethod
    def forward(ctx: FunctionCtx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class MaskedLoraLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        p0: float,
        tau: float = 2 / 3,
        hard: bool = True,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling, self.p0, self.tau, self.hard = r, alpha / r, p0, tau, hard
        d_out, d_in = base_layer.weight.shape
        dev, dt = base_layer.weight.device, dtype or base_layer.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=dev, dtype=dt))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev, dtype=dt))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init for A
        # φ starts at logit(p0) so that q = prior and the KL is 0 at step 0.
        self.mask_logits = nn.Parameter(torch.full((r,), math.log(p0 / (1 - p0)), device=dev, dtype=dt))
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mask_mode = "all"
        self.row_masks: torch.Tensor | None = None  # (R, r), set by DalorraModel.row_masks(...)
        # Seeded dropout, set by DalorraModel.row_masks(..., noise=(keys, pos)): token i of the input uses row
        # pos[i] of the uniforms drawn from stream (keys[i], noise_id); keys broadcast over pos.
        self.row_noise: tuple[torch.Tensor, torch.Tensor] | None = None
        self.noise_id = 0  # this module's share of every stream (DalorraModel numbers its modules)

    @property
    def keep_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.mask_logits)  # π = σ(φ), shape (r,)

    def kl(self) -> torch.Tensor:
        """KL(q || prior) = Σ_j π log(π/p0) + (1−π) log((1−π)/(1−p0)), in a log-sigmoid stable form."""
        pi = self.keep_prob
        log_pi, log_1m = F.logsigmoid(self.mask_logits), F.logsigmoid(-self.mask_logits)
        return (pi * (log_pi - math.log(self.p0)) + (1 - pi) * (log_1m - math.log(1 - self.p0))).sum()

    def concrete_mask(self, rows: int) -> torch.Tensor:
        """Binary Concrete: z̃ = σ((φ + log u − log(1−u)) / τ); hard: 1[z̃ > 0.5] forward, ∂z̃ backward."""
        u = torch.rand(rows, self.r, device=self.mask_logits.device, dtype=self.mask_logits.dtype)
        u = u.clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((self.mask_logits + torch.log(u) - torch.log1p(-u)) / self.tau)  # (R, r)
        if not self.hard:
            return soft
        return _StraightThrough.apply(soft)

    def _mask(self, rows: int) -> torch.Tensor | None:
        mode = self.mask_mode
        if mode == "all":
            return None
        if mode == "mean":
            return self.keep_prob.expand(rows, self.r)
        if mode == "rows":
            if self.row_masks is None or self.row_masks.shape[0] != rows:
                got = None if self.row_masks is None else tuple(self.row_masks.shape)
                raise RuntimeError(f"row masks {got} do not match a batch of {rows} rows")
            return self.row_masks
        if mode == "concrete":
            return self.concrete_mask(rows)
        raise ValueError(f"unknown mask mode {mode!r}; one of {MASK_MODES}")

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout at rate p on x (..., d_in), kept entries scaled by 1/(1−p) as nn.Dropout does.

        Under row_noise a token's mask depends only on its stream key and position, so the same (seed, draw,
        position) gets the same noise whatever the padding, the batch or the scoring path."""
        if self.row_noise is None or self.dropout_p == 0:
            return self.dropout(x)
        keys, pos = (t.cpu() for t in self.row_noise)
        if tuple(pos.shape) != tuple(x.shape[:-1]):
            raise RuntimeError(
                f"dropout positions {tuple(pos.shape)} do not match an input of {tuple(x.shape)}"
            )
        keys = keys.reshape(*keys.shape, *[1] * (pos.dim() - keys.dim())).expand(pos.shape)
        keep = torch.empty(*pos.shape, x.shape[-1], dtype=torch.bool)
        for key in keys.unique().tolist():
            sel = keys == key
            g = torch.Generator().manual_seed(stream_seed(key, self.noise_id))
            at = pos[sel]  # (N,) positions of this stream's tokens
            u = torch.rand(
                int(at.max()) + 1, x.shape[-1], generator=g
            )  # row t: position t (prefix-consistent)
            keep[sel] = u[at] >= self.dropout_p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.dropout_p)

    def lora_delta(self, x: torch.Tensor, weight_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(alpha/r) · B diag(z_row) A x for x of shape (R, ..., d_in); `weight_rows` selects output rows of B."""
        h = F.linear(self._dropout(x).to(self.lora_A.dtype), self.lora_A)  # (R, ..., r); factors may be fp32
        z = self._mask(x.shape[0])
        if z is not None:
            h = h * z.view(z.shape[0], *([1] * (h.dim() - 2)), self.r)
        B = self.lora_B if weight_rows is None else self.lora_B[weight_rows]
        return F.linear(h, B) * self.scaling  # (R, ..., d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.mask_mode == "off":
            return out
        return out + self.lora_delta(x).to(out.dtype)

    def forward_rows(self, x: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
        """Only the output rows `weight_rows` (e.g. the K answer-letter tokens of lm_head): x (R, d_in) → (R, len)."""
        W = self.base_layer.weight[weight_rows]  # (len, d_in)
        b = None if self.base_layer.bias is None else self.base_layer.bias[weight_rows]
        out = F.linear(x, W, b)
        if self.mask_mode == "off":
            return out
        return out + self.lora_delta(x, weight_rows).to(out.dtype)

    def merged_delta(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = (alpha/r) B diag(z) A for one mask (None: all on), shape (d_out, d_in)."""
        B = self.lora_B if mask is None else self.lora_B * mask
        return (B @ self.lora_A) * self.scaling
