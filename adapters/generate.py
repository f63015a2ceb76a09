"""Text generation with an adapter: decode with the mean-mask network, then score the answer under S masks.

Decoding runs the adapter with every rank switch at its expectation (z = E[z]: σ(φ) for DALorRA, the mean of
the member blocks for an ensemble, all on for plain LoRA / MAP / MC dropout with dropout off) — one
deterministic network, so decoding costs what plain LoRA costs. The uncertainty pass then runs prompt + answer
under S hard draws z_s (the same seeded draws /predict uses) as S rows of ONE teacher-forced forward, and
reduces the full-vocabulary distributions at the answer's positions (adapters/generation.py has the definitions).

The server (server/hf_generate.py) and the offline fit of the generation thresholds (adapters/short_answers.py)
both call `generate` here. A `lock`, when given, is taken per decoding step, so a server's /predict batches
interleave with a long generation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from .generation import GeneratedChoice, GenerateRequest, GenerateResult, TokenScores
from .masks import stream_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .model import DalorraModel

TOKEN_CHUNK = (
    16  # answer positions reduced at once in the uncertainty pass: (S, 16, V) float64 ≈ 63 MB at S = 10
)
ROW_TOKENS = (
    128  # a multiple-choice row is about this many tokens: a piece of work costs tokens / ROW_TOKENS rows
)
PIECE_TOKENS = 2560  # the uncertainty pass runs in pieces of at most this many tokens (≈ 20 rows)

# The model is held per piece of work: a context manager (a lock), or gate(rows) → one for a piece of `rows` rows
# (the server's scheduler; rows = tokens / ROW_TOKENS), so other requests interleave with a long generation.
Lock = AbstractContextManager[object] | Callable[[int], AbstractContextManager[object]] | None

OnToken = Callable[[int, str, dict | None], None]  # (choice index, new text, token info) while decoding


def work_rows(prompt_tokens: int, max_tokens: int, n: int, samples: int) -> int:
    """A generation's cost in rows, as the scheduler counts work: decoding n answers of up to max_tokens tokens
    (one token per step each), then the uncertainty pass over S rows of prompt + answer per answer, plus lm_head
    over the whole vocabulary at every answer position (≈ 30 % of a SmolLM2 token's cost)."""
    decode = n * (prompt_tokens + max_tokens) / ROW_TOKENS
    score = 1.3 * samples * n * (prompt_tokens + max_tokens) / ROW_TOKENS
    return max(1, math.ceil(decode + score))


def hold(lock: Lock, rows: int) -> AbstractContextManager[object]:
    """The context that holds the model for a piece of work of `rows` rows."""
    if lock is None:
        return nullcontext()
    if hasattr(lock, "__enter__"):
        return lock  # type: ignore[return-value]
    return lock(max(1, math.ceil(rows)))


class PromptError(ValueError):
    """The request's prompt cannot be generated from (empty, no chat template, too long)."""


class PromptTooLong(PromptError):
    """The prompt has more tokens than the caller's limit."""


def prompt_ids(model: DalorraModel, req: GenerateRequest, max_tokens: int | None = None) -> list[int]:
    """Token ids of the request's prompt: raw text (with the tokenizer's BOS, if any) or the chat template."""
    tok = model.tokenizer
    if req.messages is not None:
        if not getattr(tok, "chat_template", None):
            raise PromptError("the base model's tokenizer has no chat template; use /v1/completions")
        text = tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in req.messages], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, add_special_tokens=False).input_ids
    else:
        ids = tok(req.prompt or "", add_special_tokens=True).input_ids
    if not ids:
        raise PromptError("the prompt is empty")
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(f"prompt is {len(ids)} tokens; at most {max_tokens}")
    return ids


def eos_ids(model: DalorraModel) -> set[int]:
    ids = set()
    gc = getattr(model.base, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids.update([e] if isinstance(e, int) else (e or []))
    if model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def mean_masks(model: DalorraModel) -> dict[str, torch.Tensor] | None:
    """E[z] per module, shape (1, r); None means all switches on (no stochastic switches to average)."""
    if model.fixed_masks:  # ensembles: the mean of the member blocks (the average of the members' ΔW)
        draws = model.draw_masks(model.distinct_draws() or 1, 0)
        return {n: d.mean(0, keepdim=True) for n, d in draws.items()}
    if model.cfg.stochastic:
        return {n: lay.keep_prob.detach()[None] for n, lay in model.adapted.items()}
    return None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """(n, V) logits → (n,) token ids: greedy at temperature 0, else nucleus sampling at `temperature`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p (≥ 1 token)
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _Decoded:
    """One choice's tokens and text, with stop strings and incremental (streamable) text."""

    def __init__(self, tok: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.text, self.sent, self.cut = "", 0, None
        self.finish: str | None = None

    def add(self, token: int, is_eos: bool) -> None:
        self.ids.append(token)
        if is_eos:
            self.finish = "stop"
            return
        self.text = self.tok.decode(self.ids, skip_special_tokens=False)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.cut, self.finish = min(hits), "stop"

    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]

    def delta(self) -> str:
        """Text not yet sent that can no longer change: holds back an incomplete UTF-8 character and any
        tail that could still become a stop string."""
        if self.finish is not None:
            safe = len(self.final_text())
        else:
            safe = len(self.text) - (max(map(len, self.stop)) - 1 if self.stop else 0)
            if self.text.endswith("\ufffd"):
                safe = min(safe, len(self.text) - 1)
        out = self.text[self.sent : max(self.sent, safe)]
        self.sent = max(self.sent, safe)
        return out

    def scored_ids(self) -> list[int]:
        """The answer's tokens: all of them (the EOS that ended it included), or up to the stop string's start."""
        if self.cut is None:
            return list(self.ids)
        for k in range(len(self.ids) + 1):  # the shortest prefix that already holds the returned text
            if len(self.tok.decode(self.ids[:k], skip_special_tokens=False)) >= self.cut:
                return self.ids[:k]
        return list(self.ids)


@torch.no_grad()
def generate(
    model: DalorraModel,
    req: GenerateRequest,
    lock: Lock = None,
    max_prompt_tokens: int | None = None,
    on_token: OnToken | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> GenerateResult:
    """Decode req.n answers with the mean-mask network, then (req.samples > 0) score them under S masks.

    on_token streams each choice's new text as it becomes final; cancelled() is polled once per step."""
    t0 = time.perf_counter()
    tok = model.tokenizer
    prompt = prompt_ids(model, req, max_prompt_tokens)
    device = next(model.base.parameters()).device
    n = req.n
    eos = set() if req.ignore_eos else eos_ids(model)
    gen = torch.Generator().manual_seed(req.seed if req.seed is not None else torch.seed() % (2**63))
    mean = mean_masks(model)
    rows0 = torch.zeros(n, dtype=torch.long, device=device)
    outs = [_Decoded(tok, req.stop) for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    tops: list[list[list[tuple[str, float]]]] = [[] for _ in range(n)]
    ids = torch.tensor([prompt] * n, device=device)  # (n, Lp): the same prompt, no padding
    past = None
    for _ in range(req.max_tokens):
        if cancelled():
            break
        with hold(lock, n * ids.shape[1] / ROW_TOKENS), model.row_masks(mean, rows0):  # z = E[z] on every row
            out = model.decoder(input_ids=ids, past_key_values=past, use_cache=True)
            logits = model.lm_head(out.last_hidden_state[:, -1]).float()  # (n, V)
        past = out.past_key_values
        nxt = _sample(logits, req.temperature, req.top_p, gen)  # (n,)
        logp = torch.log_softmax(logits, -1)
        for i, d in enumerate(outs):
            if d.finish is not None:
                continue
            t = int(nxt[i])
            d.add(t, t in eos)
            info = None
            if req.top_logprobs is not None:
                lp = float(logp[i, t])
                lps[i].append(lp)
                k = req.top_logprobs
                top = []
                if k:
                    v, j = logp[i].topk(k)
                    top = [(tok.decode([int(a)]), float(b)) for b, a in zip(v, j, strict=True)]
                tops[i].append(top)
                info = {"token": tok.decode([t]), "logprob": lp, "top": top}
            if on_token is not None:
                on_token(i, d.delta(), info)
        if all(d.finish is not None for d in outs):
            break
        ids = nxt[:, None]
    was_cancelled = cancelled()
    choices = []
    for i, d in enumerate(outs):
        finish = d.finish or ("cancelled" if was_cancelled else "length")
        if on_token is not None and d.finish is None:
            d.finish = finish
            rest = d.delta()
            if rest:
                on_token(i, rest, None)
        kept = d.scored_ids()
        choices.append(
            GeneratedChoice(
                text=d.final_text(),
                finish_reason=finish,
                token_ids=kept,
                tokens=[tok.decode([t]) for t in kept],
                logprobs=lps[i][: len(kept)] if req.top_logprobs is not None else None,
                top_logprobs=tops[i][: len(kept)] if req.top_logprobs is not None else None,
            )
        )
    samples, t1 = 0, time.perf_counter()
    if req.samples > 0 and not was_cancelled:
        scores, samples = score_answers(
            model, prompt, [c.token_ids for c in choices], req.samples, req.mask_seed, lock, cancelled
        )
        for c, s in zip(choices, scores, strict=True):
            c.scores = s
    return GenerateResult(
        prompt_tokens=len(prompt),
        choices=choices,
        samples=samples,
        decode_seconds=t1 - t0,
        score_seconds=time.perf_counter() - t1,
    )


def vocab_uncertainty(lp: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """lp (S, T, V) log-probabilities of the next token under each mask, y (T,) the answer's tokens.

    Returns per-token entropy H[p̄_t], aleatoric E_s H[p_{s,t}], epistemic (their difference, the mutual
    information), mask_logprobs (S, T) = log p_{s,t}(y_t) and mean_logprobs (T,) = log p̄_t(y_t)."""
    lp = lp.double()
    S = lp.shape[0]
    h_s = torch.special.entr(lp.exp()).sum(-1)  # (S, T): −Σ_v p log p, 0·log 0 = 0
    lpbar = torch.logsumexp(lp, 0) - math.log(S)  # (T, V): log of the average probability
    H = torch.special.entr(lpbar.exp()).sum(-1)  # (T,)
    alea = h_s.mean(0)
    return {
        "entropy": H,
        "aleatoric": alea,
        "epistemic": (H - alea).clamp(min=0.0),
        "mask_logprobs": lp.gather(-1, y.expand(S, -1)[..., None]).squeeze(-1),
        "mean_logprobs": lpbar.gather(-1, y[:, None]).squeeze(-1),
    }


@torch.no_grad()
def score_answers(
    model: DalorraModel,
    prompt: list[int],
    answers: list[list[int]],
    samples: int,
    seed: int,
    lock: Lock = None,
    cancelled: Callable[[], bool] = lambda: False,
    piece_tokens: int = PIECE_TOKENS,
) -> tuple[list[TokenScores], int]:
    """Teacher-forced scores of every answer under S' = min(S, distinct draws) masks.

    Row (j, s) is prompt + answer_j under mask z_s(seed); the logits at the positions before each answer token
    give p_{s,t}. The rows run in pieces of at most `piece_tokens` tokens, each holding the model on its own (so
    other work interleaves with a long prompt); only the answer positions' hidden states are kept, then lm_head
    and the reductions run per answer in TOKEN_CHUNK positions. A row's result does not depend on the piece it ran
    in (masks and MC-dropout noise are per row). Returns one TokenScores per answer and S'."""
    device = next(model.base.parameters()).device
    S = min(samples, model.distinct_draws() or samples)
    masks = model.draw_masks(S, seed)
    live = [j for j, a in enumerate(answers) if a]
    empty = TokenScores(*(np.zeros(0) for _ in range(3)), np.zeros((S, 0)), np.zeros(0))
    out = [empty] * len(answers)
    if not live:
        return out, S
    keys = torch.tensor([stream_seed(seed, s) for s in range(S)], device=device)

    def noise(rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """MC dropout: row s's noise from its own stream (seed, s) at each token's position, as in scoring."""
        return (keys[rows], pos) if model.cfg.method == "mcdropout" else None

    L = len(prompt) + max(len(answers[j]) for j in live)
    per_piece = max(1, piece_tokens // L)  # rows per piece
    for j in live:
        y = torch.tensor(answers[j], device=device)
        T = len(y)
        seq = prompt + answers[j]
        kept: list[torch.Tensor] = []  # (s, T, d) hidden states at the positions predicting y, per piece
        for a in range(0, S, per_piece):
            if cancelled():
                return out, S
            rows = torch.arange(a, min(S, a + per_piece), device=device)
            ids = torch.tensor([seq] * len(rows), device=device)
            pos = torch.arange(len(seq), device=device).expand(len(rows), -1)  # (s, L_j)
            with (
                hold(lock, len(rows) * len(seq) / ROW_TOKENS),
                model.row_masks(masks, rows, noise(rows, pos)),
            ):
                hidden = model.decoder(input_ids=ids, use_cache=False).last_hidden_state  # (s, L_j, d)
            kept.append(hidden[:, len(prompt) - 1 : len(seq) - 1])
        h_all = torch.cat(kept)  # (S, T, d)
        parts: dict[str, list[torch.Tensor]] = {}
        for b0 in range(0, T, TOKEN_CHUNK):  # bounded memory: (S, chunk, V) at a time
            b1 = min(T, b0 + TOKEN_CHUNK)
            if cancelled():
                return out, S
            at = torch.arange(len(prompt) - 1 + b0, len(prompt) - 1 + b1, device=device).expand(S, -1)
            every = torch.arange(S, device=device)
            with hold(lock, S * (b1 - b0) / ROW_TOKENS), model.row_masks(masks, every, noise(every, at)):
                lp = torch.log_softmax(model.lm_head(h_all[:, b0:b1]).float(), -1)  # (S, b1−b0, V)
            for k, v in vocab_uncertainty(lp, y[b0:b1]).items():
                parts.setdefault(k, []).append(v)
        cat = {k: torch.cat(v, -1).cpu().numpy() for k, v in parts.items()}
        out[j] = TokenScores(
            cat["entropy"], cat["aleatoric"], cat["epistemic"], cat["mask_logprobs"], cat["mean_logprobs"]
        )
    return out, S
