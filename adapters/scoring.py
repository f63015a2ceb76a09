"""Turn multiple-choice items into K choice logits per (item, mask sample): the (S, B, K) tensor.

Two modes (DESIGN §3), same output:
  letter  one forward per row over the prompt; logits of the K answer-letter tokens at the last position,
          computed from only those K rows of lm_head.
  cloze   the prompt once per row, then the K continuations from its KV cache (cost: one prompt plus K
          short continuations); a choice's logit is its (optionally length-normalised) log-likelihood.
A "row" is one (item, mask sample) pair; all rows go through one forward, row i under mask sample s(i).
Items with different K share a batch: missing choices get logit −inf, so each softmax is over its own K.
`score_draws` owns the expansion of requests into rows (mask draws, layout, clipping to distinct draws, MC-dropout
seeding); offline `score` and the HF backend both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .config import PromptFormat
from .data import Item
from .masks import stream_seed

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from .model import DalorraModel
    from .multi import MixedMasks, MixedView

    # masked(index, keys, pos): the context in which the next input's rows use their masks and dropout streams
    MaskedCtx = Callable[
        [torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], AbstractContextManager[None]
    ]

MAX_CONTINUATION_TOKENS = 64


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]  # prompt token ids (left-truncated to fmt.max_length)
    conts: tuple[tuple[int, ...], ...]  # cloze: token ids of each choice's continuation
    norms: tuple[float, ...]  # cloze: divisor of each choice's summed log-prob (1 = none)
    k: int


def render_prompt(item: Item, fmt: PromptFormat) -> str:
    choices = " ".join(f"{fmt.letters[i]}. {c}." for i, c in enumerate(item.choices))
    text = fmt.template.format(question=item.question, choices=choices, context=item.context or "")
    if item.context and "{context}" not in fmt.template:
        text = f"{item.context}\n{text}"
    return text


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, k: int) -> list[int]:
    """The token each answer letter becomes right after "Answer:" (with this tokenizer: ' A', not 'A')."""
    stem = tokenizer("Answer:", add_special_tokens=False).input_ids
    ids = []
    for letter in fmt.letters[:k]:
        full = tokenizer("Answer: " + letter, add_special_tokens=False).input_ids
        if full[: len(stem)] != stem or len(full) != len(stem) + 1:
            raise ValueError(
                f"answer letter {letter!r} is not a single token after 'Answer:' for this tokenizer"
            )
        ids.append(full[-1])
    return ids


def encode(
    items: list[Item], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, strict: bool = False
) -> list[Encoded]:
    """Token ids per item. strict=True refuses an over-long prompt instead of left-truncating it."""
    out = []
    for item in items:
        if len(item.choices) > len(fmt.letters) and fmt.mode == "letter":
            raise ValueError(f"item {item.id!r} has {len(item.choices)} choices; at most {len(fmt.letters)}")
        prompt = tokenizer(render_prompt(item, fmt), add_special_tokens=True).input_ids
        if strict and len(prompt) > fmt.max_length:
            raise ValueError(f"prompt is {len(prompt)} tokens; this adapter accepts at most {fmt.max_length}")
        prompt = prompt[-fmt.max_length :]
        conts, norms = (), ()
        if fmt.mode == "cloze":
            toks = [tokenizer(" " + c, add_special_tokens=False).input_ids for c in item.choices]
            if strict and max(len(t) for t in toks) > MAX_CONTINUATION_TOKENS:
                raise ValueError(f"a choice exceeds {MAX_CONTINUATION_TOKENS} tokens")
            toks = [t[:MAX_CONTINUATION_TOKENS] for t in toks]
            if any(len(t) == 0 for t in toks):
                raise ValueError(f"item {item.id!r}: a choice tokenises to nothing")
            conts = tuple(tuple(t) for t in toks)
            if fmt.normalize == "tokens":
                norms = tuple(float(len(t)) for t in toks)
            elif fmt.normalize == "chars":
                norms = tuple(float(max(1, len(c))) for c in item.choices)
            else:
                norms = tuple(1.0 for _ in toks)
        out.append(Encoded(prompt, conts, norms, len(item.choices)))
    return out


def _left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding; position ids count only real tokens, so padding never shifts RoPE positions."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, L - len(s) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device)


def _head(model: DalorraModel, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """lm_head on h (N, d), optionally only the output rows `rows` (letter tokens); float32 whatever the model's
    dtype, so softmax, entropy and MI are computed in float32 (or wider)."""
    head = model.lm_head
    if rows is None:
        return head(h).float()
    if hasattr(head, "forward_rows"):
        return head.forward_rows(h, rows).float()
    return F.linear(h, head.weight[rows], None if head.bias is None else head.bias[rows]).float()


def choice_logits(
    model: DalorraModel,
    enc: list[Encoded],
    row_items: list[int],
    masks: dict[str, torch.Tensor] | None,
    row_samples: torch.Tensor | None = None,
    cloze_cache: bool = True,
    shared_lower: bool = True,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, Kmax) choice logits for rows R; row i scores item enc[row_items[i]] under masks[·][row_samples[i]].

    masks None: whatever mask mode the layers are in (all on, mean, concrete for training, off).
    shared_lower: for a top-L adapter (no adapter below layer `lo`), run layers < lo once per distinct item
    instead of once per row (inference only; False gives the plain path the tests compare against).
    row_keys: (R,) MC-dropout streams (score_draws makes them from (seed, draw)). Row i's prompt tokens take their
    dropout noise from stream row_keys[i] at their positions, choice k's tokens from stream (row_keys[i], 1 + k),
    so the noise never depends on padding, batch or path. None: dropout as the layers' mode says.
    """
    fmt = model.fmt
    device = next(model.base.parameters()).device
    kmax = max(enc[i].k for i in row_items)
    pad_id = model.tokenizer.pad_token_id
    valid = torch.tensor([[k < enc[i].k for k in range(kmax)] for i in row_items], device=device)  # (R, Kmax)
    if row_keys is not None and masks is None:
        raise ValueError("seeded dropout (row_keys) needs row masks")
    ckeys = (
        None
        if row_keys is None
        else torch.tensor(  # (R·Kmax,) stream of each (row, choice) continuation
            [stream_seed(key, 1 + k) for key in row_keys.tolist() for k in range(kmax)], device=device
        )
    )

    def masked(
        index: torch.Tensor | None, keys: torch.Tensor | None = None, pos: torch.Tensor | None = None
    ) -> AbstractContextManager[None]:
        """The next input's row j is scoring row index[j] (None: j); keys/pos: its tokens' dropout streams."""
        if masks is None:
            return nullcontext()
        return model.row_masks(
            masks,
            row_samples[index] if index is not None else row_samples,
            None if keys is None else (keys, pos),
        )

    lo = (
        model.first_adapted_layer()
        if shared_lower and masks is not None and not torch.is_grad_enabled()
        else 0
    )
    if lo > 0:  # top-L adapter: layers below `lo` run once per question, S rows only above
        logits = _split_logits(model, enc, row_items, kmax, device, masked, lo, row_keys, ckeys)
    elif fmt.mode == "letter":
        ids, attn, pos = _left_pad([enc[i].prompt for i in row_items], pad_id, device)
        with masked(None, row_keys, pos):
            h = model.decoder(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False
            ).last_hidden_state[:, -1]  # (R, d)
        rows = torch.tensor(letter_token_ids(model.tokenizer, fmt, kmax), device=device)
        with masked(None, row_keys, pos[:, -1]):
            logits = _head(model, h, rows)  # (R, Kmax)
    elif cloze_cache:
        logits = _cloze_cached(model, enc, row_items, kmax, device, masked, row_keys, ckeys)
    else:
        logits = _cloze_full(model, enc, row_items, kmax, device, masked, row_keys, ckeys)
    return logits.masked_fill(~valid, float("-inf"))


def _cont_pos(ids: torch.Tensor) -> torch.Tensor:
    """(RK, Lc) positions of continuation tokens within their own dropout stream: 0, 1, …"""
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)


def _cont_table(
    enc: list[Encoded], row_items: list[int], kmax: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continuations of every (row, choice), right-padded: ids (R·Kmax, Lc), lengths (R·Kmax,), norms."""
    conts, norms = [], []
    for i in row_items:
        for k in range(kmax):
            if k < enc[i].k:
                conts.append(list(enc[i].conts[k]))
                norms.append(enc[i].norms[k])
            else:  # a padded choice: scored on a dummy token, then masked to −inf
                conts.append([enc[i].prompt[-1]])
                norms.append(1.0)
    Lc = max(len(c) for c in conts)
    ids = torch.zeros((len(conts), Lc), dtype=torch.long)
    lens = torch.tensor([len(c) for c in conts])
    for j, c in enumerate(conts):
        ids[j, : len(c)] = torch.tensor(c)
    return ids.to(device), lens.to(device), torch.tensor(norms, device=device)


def _gather_cont_logprobs(
    model: DalorraModel,
    hidden: torch.Tensor,
    first_lp: torch.Tensor,
    ids: torch.Tensor,
    lens: torch.Tensor,
    masked_ctx: MaskedCtx,
    rk_index: torch.Tensor,
    keys: torch.Tensor | None,
) -> torch.Tensor:
    """Σ_t log p(cont_t | ·): token 0 from first_lp (RK, V); token t ≥ 1 from hidden[:, t−1] (RK, Lc, d).
    keys: (RK,) dropout streams of the continuations (None: no seeded dropout)."""
    RK, Lc = ids.shape
    total = first_lp.gather(1, ids[:, :1]).squeeze(1)  # (RK,)
    if Lc > 1:
        t = torch.arange(1, Lc, device=ids.device)
        valid = t[None, :] < lens[:, None]  # (RK, Lc−1)
        rk, tt = valid.nonzero(as_tuple=True)  # only real continuation positions reach lm_head
        if rk.numel():
            with masked_ctx(rk_index[rk], None if keys is None else keys[rk], tt):
                lp = torch.log_softmax(_head(model, hidden[rk, tt]), -1)  # (N, V)
            tok_lp = lp.gather(1, ids[rk, tt + 1][:, None]).squeeze(1)
            total = total.index_add(0, rk, tok_lp)
    return total


def _cloze_cached(
    model: DalorraModel,
    enc: list[Encoded],
    row_items: list[int],
    kmax: int,
    device: torch.device,
    masked: MaskedCtx,
    row_keys: torch.Tensor | None,
    ckeys: torch.Tensor | None,
) -> torch.Tensor:
    R = len(row_items)
    ids, attn, pos = _left_pad([enc[i].prompt for i in row_items], model.tokenizer.pad_token_id, device)
    with masked(None, row_keys, pos):
        out = model.decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    with masked(None, row_keys, pos[:, -1]):
        first_lp = torch.log_softmax(_head(model, out.last_hidden_state[:, -1]), -1)  # (R, V)
    cache = out.past_key_values
    cache.batch_repeat_interleave(kmax)  # (R·Kmax) rows share their row's prompt keys/values
    cids, lens, norms = _cont_table(enc, row_items, kmax, device)  # (RK, Lc)
    rk_row = torch.arange(R, device=device).repeat_interleave(kmax)  # continuation row → prompt row
    cattn = (torch.arange(cids.shape[1], device=device)[None, :] < lens[:, None]).long()
    attn2 = torch.cat([attn.repeat_interleave(kmax, 0), cattn], 1)  # (RK, Lp + Lc)
    pos2 = attn.sum(1).repeat_interleave(kmax)[:, None] + torch.arange(cids.shape[1], device=device)[None]
    with masked(rk_row, ckeys, _cont_pos(cids)):
        hidden = model.decoder(
            input_ids=cids, attention_mask=attn2, position_ids=pos2, past_key_values=cache, use_cache=False
        ).last_hidden_state  # (RK, Lc, d)
    total = _gather_cont_logprobs(model, hidden, first_lp[rk_row], cids, lens, masked, rk_row, ckeys)
    return (total / norms).view(R, kmax)


def _cloze_full(
    model: DalorraModel,
    enc: list[Encoded],
    row_items: list[int],
    kmax: int,
    device: torch.device,
    masked: MaskedCtx,
    row_keys: torch.Tensor | None,
    ckeys: torch.Tensor | None,
) -> torch.Tensor:
    """Reference path: every (row, choice) as one full sequence prompt+continuation (K× the prompt cost)."""
    R = len(row_items)
    cids, lens, norms = _cont_table(enc, row_items, kmax, device)
    rk_row = torch.arange(R, device=device).repeat_interleave(kmax)
    seqs = [enc[row_items[r]].prompt + cids[j, : lens[j]].tolist() for j, r in enumerate(rk_row.tolist())]
    ids, attn, pos = _left_pad(seqs, model.tokenizer.pad_token_id, device)
    L = ids.shape[1]
    keys = spos = None
    if (
        row_keys is not None
    ):  # the cached path's streams: prompt tokens the row's, continuation tokens the choice's
        n_prompt = torch.tensor([len(enc[row_items[r]].prompt) for r in rk_row.tolist()], device=device)[
            :, None
        ]
        in_cont = pos >= n_prompt  # (RK, L)
        keys = torch.where(in_cont, ckeys[:, None], row_keys[rk_row][:, None])
        spos = torch.where(in_cont, pos - n_prompt, pos)
    with masked(rk_row, keys, spos):
        hidden = model.decoder(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False
        ).last_hidden_state  # (RK, L, d)
    total = torch.zeros(len(seqs), device=device)
    for j in range(len(seqs)):  # plain loop: this path is the reference, not the fast one
        n = int(lens[j])
        at = slice(L - n - 1, L - 1)  # the positions predicting the n continuation tokens
        with masked(
            rk_row[j].repeat(n), None if keys is None else keys[j, at], None if keys is None else spos[j, at]
        ):
            lp = torch.log_softmax(_head(model, hidden[j, at]), -1)  # (n, V)
        total[j] = lp.gather(1, ids[j, L - n :][:, None]).sum()
    return (total / norms).view(R, kmax)


def rows_for(batch: int, samples: int) -> tuple[list[int], torch.Tensor]:
    """Row layout of score(): sample-major, row = s·B + b."""
    items = [b for _ in range(samples) for b in range(batch)]
    return items, torch.arange(samples).repeat_interleave(batch)


@dataclass(frozen=True)
class DrawRequest:
    """One request of score_draws: its items under mask draws first … first+samples−1 of `seed`."""

    enc: list[Encoded]
    samples: int
    seed: int
    first: int = 0  # adaptive rounds continue where the last one stopped


def draws_to_score(model: DalorraModel, samples: int, first: int = 0) -> int:
    """Draws first … first+samples−1, clipped to the adapter's distinct ones: a deterministic adapter has 1 and an
    M-member ensemble M (draw s is member s mod M), so more draws would only repeat rows; 0 past them."""
    distinct = model.distinct_draws()
    return samples if distinct is None else max(0, min(first + samples, distinct) - first)


@torch.no_grad()
def score_draws(
    model: DalorraModel | MixedView,
    requests: list[DrawRequest],
    cloze_cache: bool = True,
    adapters: Sequence[DalorraModel] | None = None,
) -> list[np.ndarray]:
    """Choice logits (S'_i, B_i, K_i) per request (float64, −inf for a missing choice), all rows in one forward.

    S'_i = draws_to_score(model, samples, first); K_i the most choices among the request's items. Rows are
    sample-major within a request (row = s·B_i + b). Draw s's masks and, for an MC-dropout adapter, its dropout
    noise depend only on (seed, s), so a request gets the same logits whatever else shares the forward.
    adapters: with a MixedView (adapters/multi.py) as `model`, request i's adapter (one of the view's models):
    each row then runs under its own adapter's factors and masks, in the same forward.
    """
    owners = list(adapters) if adapters is not None else [model] * len(requests)
    if adapters is not None and len(owners) != len(requests):
        raise ValueError(f"{len(owners)} adapters for {len(requests)} requests")
    if (
        adapters is not None
    ):  # rows grouped by adapter, so each adapter's rows are one block (multi.AdapterSlot)
        rank = {id(m): a for a, m in enumerate(model.models)}
        order = sorted(range(len(requests)), key=lambda i: rank[id(owners[i])])
        if order != list(range(len(requests))):
            got = score_draws(model, [requests[i] for i in order], cloze_cache, [owners[i] for i in order])
            out: list[np.ndarray] = [np.empty(0)] * len(requests)
            for j, i in enumerate(order):
                out[i] = got[j]
            return out
    device = next(model.base.parameters()).device
    counts = [draws_to_score(m, r.samples, r.first) for m, r in zip(owners, requests, strict=True)]
    enc: list[Encoded] = []
    row_items: list[int] = []
    row_samples: list[int] = []
    row_keys: list[int] = []
    drawn: list[
        tuple[int, dict[str, torch.Tensor]]
    ] = []  # (owner index, name → (n, r)) per request with draws
    index_of = {id(m): a for a, m in enumerate(model.models)} if adapters is not None else {id(model): 0}
    for m, r, n in zip(owners, requests, counts, strict=True):
        if n:
            drawn.append((index_of[id(m)], m.draw_masks(n, r.seed, r.first)))
            for s in range(n):
                row_items += range(len(enc), len(enc) + len(r.enc))
                row_samples += [len(row_keys) + s] * len(r.enc)
            row_keys += [stream_seed(r.seed, r.first + s) for s in range(n)]  # one dropout stream per draw
        enc += r.enc
    shapes = [(n, len(r.enc), max(e.k for e in r.enc)) for r, n in zip(requests, counts, strict=True)]
    if not row_items:
        return [np.zeros(shape) for shape in shapes]
    mc = any(m.cfg.method == "mcdropout" for m in owners)
    if adapters is None:
        masks = {name: torch.cat([d[name] for _, d in drawn]) for name in drawn[0][1]}  # name → (Σ S'_i, r)
    else:
        masks = _mixed_masks(model.models, drawn, device)
    samples = torch.tensor(row_samples, device=device)
    keys = torch.tensor(row_keys, device=device)[samples] if mc else None
    logits = choice_logits(model, enc, row_items, masks, samples, cloze_cache, row_keys=keys)
    logits = logits.double().cpu().numpy()  # (R, Kmax)
    out, start = [], 0
    for n, b, k in shapes:
        out.append(logits[start : start + n * b].reshape(n, b, logits.shape[1])[..., :k])
        start += n * b
    return out


def _mixed_masks(
    models: Sequence[DalorraModel], drawn: list[tuple[int, dict[str, torch.Tensor]]], device: torch.device
) -> MixedMasks:
    """One (N, r_a) table per adapter and module over the batch's N draws; rows of other adapters stay 1."""
    from .multi import MixedMasks

    owner = torch.cat([torch.full((len(next(iter(d.values()))),), a, dtype=torch.long) for a, d in drawn])
    N = len(owner)
    per: list[dict[str, torch.Tensor]] = []
    for a, m in enumerate(models):
        table = {
            n: torch.ones(N, lay.r, dtype=lay.lora_A.dtype, device=device) for n, lay in m.adapted.items()
        }
        start = 0
        for owner_a, d in drawn:
            size = len(next(iter(d.values())))
            if owner_a == a:
                for n, t in d.items():
                    table[n][start : start + size] = t
            start += size
        per.append(table)
    return MixedMasks(owner.to(device), tuple(per))


def score(
    model: DalorraModel,
    items: list[Item],
    samples: int = 10,
    seed: int = 0,
    batched: bool = True,
    cloze_cache: bool = True,
    encoded: list[Encoded] | None = None,
) -> np.ndarray:
    """Choice logits of shape (S', B, K) (float64, −inf for a missing choice) under S' hard mask draws.

    S' = draws_to_score(model, S): a deterministic adapter is scored once and an M-member ensemble M times (each
    member weighted equally). Draws depend only on (seed, s), so an item gets the same answer whatever else is
    in its batch. batched=False runs the S' samples as S' separate forwards (the reference the one-forward path
    must equal).
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    enc = encoded if encoded is not None else encode(items, model.tokenizer, model.fmt)
    if batched:
        return score_draws(model, [DrawRequest(enc, samples, seed)], cloze_cache)[0]
    return np.concatenate(
        [
            score_draws(model, [DrawRequest(enc, 1, seed, first=s)], cloze_cache)[0]
            for s in range(draws_to_score(model, samples))
        ]
    )


# ---- top-L adapters: shared lower layers ---------------------------------------------------------------
class _StageCache:
    """Keys/values per decoder layer for one stage; `frozen` passes read the cache without growing it."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.frozen = False

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.kv:
            pk, pv = self.kv[layer_idx]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        if not self.frozen:
            self.kv[layer_idx] = (k, v)
        return k, v

    def select(self, index: torch.Tensor) -> _StageCache:
        out = _StageCache()
        out.kv = {i: (k[index], v[index]) for i, (k, v) in self.kv.items()}
        return out


def _run_layers(
    model: DalorraModel,
    hidden: torch.Tensor,
    attn2d: torch.Tensor,
    pos: torch.Tensor,
    layers: Iterable[nn.Module],
    cache: _StageCache | None,
    past: int,
) -> torch.Tensor:
    """hidden (R, Lq, d) through `layers`; attn2d (R, past + Lq) marks real tokens, causal within the new ones."""
    R, Lq, _ = hidden.shape
    q = torch.arange(Lq, device=hidden.device)[:, None] + past
    k = torch.arange(attn2d.shape[1], device=hidden.device)[None, :]
    allowed = (k <= q)[None] & attn2d.bool()[:, None, :]  # (R, Lq, Lkv)
    allowed = allowed | (~allowed.any(-1, keepdim=True))  # fully padded query rows: attend anywhere (ignored)
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
        ~allowed, float("-inf")
    )
    mask = mask[:, None]  # (R, 1, Lq, Lkv), additive
    cos_sin = model.decoder.rotary_emb(hidden, position_ids=pos)
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=pos,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return hidden


def _split_logits(
    model: DalorraModel,
    enc: list[Encoded],
    row_items: list[int],
    kmax: int,
    device: torch.device,
    masked: MaskedCtx,
    lo: int,
    row_keys: torch.Tensor | None,
    ckeys: torch.Tensor | None,
) -> torch.Tensor:
    dec = model.decoder
    lower, upper = dec.layers[:lo], dec.layers[lo:]
    uniq = sorted(set(row_items))
    u_of = torch.tensor([uniq.index(i) for i in row_items], device=device)  # row → its distinct item
    U, R = len(uniq), len(row_items)
    ids, attn, pos = _left_pad([enc[i].prompt for i in uniq], model.tokenizer.pad_token_id, device)
    low_cache = _StageCache()
    h = _run_layers(model, dec.embed_tokens(ids), attn, pos, lower, low_cache, 0)  # (U, Lp, d), once per item
    up_cache = _StageCache()
    with masked(None, row_keys, pos[u_of]):
        h = _run_layers(model, h[u_of], attn[u_of], pos[u_of], upper, up_cache, 0)  # (R, Lp, d)
    last = dec.norm(h[:, -1])
    with masked(None, row_keys, pos[u_of][:, -1]):
        if model.fmt.mode == "letter":
            rows = torch.tensor(letter_token_ids(model.tokenizer, model.fmt, kmax), device=device)
            return _head(model, last, rows)
        first_lp = torch.log_softmax(_head(model, last), -1)  # (R, V)
    # Cloze: continuations of the U items through the lower layers once (K each), then R·K rows above.
    cids, lens, norms_u = _cont_table(enc, uniq, kmax, device)  # (U·K, Lc)
    uk_item = torch.arange(U, device=device).repeat_interleave(kmax)
    cattn = (torch.arange(cids.shape[1], device=device)[None, :] < lens[:, None]).long()
    Lp = attn.shape[1]
    attn_uk = torch.cat([attn[uk_item], cattn], 1)
    pos_uk = attn.sum(1)[uk_item][:, None] + torch.arange(cids.shape[1], device=device)[None]
    low = low_cache.select(uk_item)
    low.frozen = True
    hc = _run_layers(model, dec.embed_tokens(cids), attn_uk, pos_uk, lower, low, Lp)  # (U·K, Lc, d)
    rk = (u_of[:, None] * kmax + torch.arange(kmax, device=device)[None]).reshape(
        -1
    )  # row-choice → U·K index
    rk_row = torch.arange(R, device=device).repeat_interleave(kmax)
    up = up_cache.select(rk_row)
    up.frozen = True
    with masked(rk_row, ckeys, _cont_pos(cids[rk])):
        hidden = dec.norm(_run_layers(model, hc[rk], attn_uk[rk], pos_uk[rk], upper, up, Lp))  # (R·K, Lc, d)
    total = _gather_cont_logprobs(model, hidden, first_lp[rk_row], cids[rk], lens[rk], masked, rk_row, ckeys)
    return (total / norms_u[rk]).view(R, kmax)
