"""Mask draws as plain data: which modules share a switch, and the one seeded, prefix-consistent draw.

`draw_masks_from` is the one implementation of the mask draw: DalorraModel.draw_masks calls it, and the mask bank
(adapters/maskbank.py, used by the vLLM backend) calls it on the adapter's files, so both give the same z_1..z_M
for the same seed. `stream_seed` names the seeded streams of MC dropout's noise (adapters/scoring.py, layer.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import torch

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def mask_groups(names: Iterable[str], sharing: str = "module") -> dict[str, list[str]]:
    """Modules that share one switch per rank index: group key → member module names (sorted).

    module: every module alone (the paper). rank: one group per module kind (q_proj, v_proj, lm_head), i.e. one
    z_j for rank index j across all layers. layer: one group per decoder layer (its q_proj and v_proj), modules
    outside the decoder layers (lm_head) alone."""
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        if sharing == "module":
            key = n
        elif sharing == "rank":
            key = "kind:" + n.rsplit(".", 1)[-1]
        elif sharing == "layer":
            m = _LAYER_INDEX.search("." + n + ".")
            key = f"layer:{int(m.group(1)):04d}" if m else n
        else:
            raise ValueError(f"unknown mask sharing {sharing!r}")
        groups.setdefault(key, []).append(n)
    return groups  # insertion order: by each group's first (sorted) member name


def draw_masks_from(
    ranks: dict[str, int],
    keep: dict[str, torch.Tensor] | None,
    fixed: dict[str, torch.Tensor],
    samples: int,
    seed: int,
    first: int = 0,
    sharing: str = "module",
) -> dict[str, torch.Tensor]:
    """Hard masks z_first .. z_{first+S-1} per module, name → (S, r) float32 on the CPU.

    Sample s depends only on (seed, s), so draws are prefix-consistent: the first 4 of 10 draws are the 4
    draws, and adaptive sampling can add rounds (first = samples so far) without changing earlier ones.
    ranks: module → r. keep: module → σ(φ) of shape (r,) for a stochastic adapter, None for a deterministic
    one (all components on). fixed: module → (M, r) member blocks (ensembles); sample s uses row s mod M.
    sharing: modules of one `mask_groups` group get the same draw (their keep-probabilities are equal).
    """
    names = sorted(ranks)
    idx = torch.arange(first, first + samples)
    out = {n: torch.ones(samples, ranks[n]) for n in names}
    for n in names:
        if n in fixed:
            out[n] = fixed[n][idx % fixed[n].shape[0]].float()
    if keep is None:
        return out
    groups = mask_groups(names, sharing)
    for row, s in enumerate(idx.tolist()):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + s) % (2**63))
        for members in groups.values():  # every group draws, in the order of its first member's name
            u = torch.rand(ranks[members[0]], generator=g)
            z = (u < keep[members[0]].detach().float().cpu()).float()
            for n in members:
                if n not in fixed:
                    out[n][row] = z
    return out


def distinct_draws(method: str, stochastic: bool, fixed: dict[str, torch.Tensor]) -> int | None:
    """How many different predictions S draws can give: 1 for a deterministic adapter, M for an M-member
    ensemble, None when every draw is new (DALorRA masks, MC dropout). Scoring more is wasted work."""
    if method == "mcdropout" or (stochastic and not fixed):
        return None
    if fixed:
        return max(int(b.shape[0]) for b in fixed.values())
    return 1


def stream_seed(*parts: int) -> int:
    """A generator seed in [0, 2^63) that depends only on `parts` (the same on every machine and Python version)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
