"""Hugging Face transformers backend (CPU or GPU): every adapter's rows of a batch in one forward."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.data import Item
from adapters.scoring import DrawRequest, encode, score_draws

from .backend import Backend, BackendError, ScoreRequest

if TYPE_CHECKING:
    from adapters.generate import OnToken
    from adapters.model import DalorraModel

    from .generation import GenerateRequest, GenerateResult
    from .settings import Settings

log = logging.getLogger("dalorra.hf")


class HFBackend(Backend):
    name = "hf"

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.models: dict = {}  # adapter name → DalorraModel (each on its own copy of the base)
        self.lock = threading.Lock()  # scoring and (un)loading never overlap on one model
        self.warmup_seconds: dict[str, float] = {}  # adapter → torch.compile + warm-up time (COMPILE=true)

    def load_adapter(self, name: str, path: str) -> dict:
        base, tok = load_base(self.settings.base_model, device=self.settings.device)
        model = load_adapter(path, base, tok, self.settings.base_model or "")
        model.eval()
        if self.settings.compile:
            self.warmup_seconds[name] = self._compile(model, name)
        with self.lock:  # only a warmed-up model becomes visible: readiness and hot loads wait for it
            self.models[name] = model
        return model.record

    @torch.no_grad()
    def _compile(self, model: DalorraModel, name: str) -> float:
        """torch.compile the graph-break-free parts of every decoder layer (MLP, RMSNorms; dynamic shapes) and
        run warm-up batches so the compile cost is paid at load, not by the first user.

        Attention stays eager: its KV-cache objects break graphs (a whole-layer compile hit dynamo's recompile
        limit in a trial). Warm-up covers one row (a deterministic answer) and several rows, since dynamic
        shapes still specialise a dimension of size 1."""
        t0 = time.perf_counter()
        for layer in model.decoder.layers:
            for mod in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                mod.compile(dynamic=True)
        model.decoder.norm.compile(dynamic=True)
        for rows in (1, max(2, self.settings.default_samples)):
            self._score_group(
                model,
                [ScoreRequest(name, "Which warms the model up?", ("this one", "that one"), None, rows, 0)],
            )
        seconds = time.perf_counter() - t0
        log.info("adapter %s: torch.compile + warm-up took %.1f s", name, seconds)
        return seconds

    def generate(
        self,
        request: GenerateRequest,
        on_token: OnToken | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerateResult:
        """Text generation (server/hf_generate.py): the lock is taken per decoding step, not for the whole answer."""
        from .hf_generate import generate

        model = self.models.get(request.adapter)
        if model is None:
            raise BackendError(f"adapter {request.adapter!r} is not loaded")
        return generate(
            model, request, self.lock, self.settings.max_prompt_tokens, on_token, cancelled or (lambda: False)
        )

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.models.pop(name, None)

    def adapter_names(self) -> list[str]:
        return list(self.models)

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray | Exception]:
        out: list[np.ndarray | Exception | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        with self.lock:
            for name, idx in groups.items():
                model = self.models.get(name)
                if model is None:
                    for i in idx:
                        out[i] = BackendError(f"adapter {name!r} is not loaded")
                    continue
                for chunk in self._chunks(idx, requests):
                    for i, res in zip(
                        chunk, self._score_isolated(model, [requests[i] for i in chunk]), strict=True
                    ):
                        out[i] = res
        return out  # type: ignore[return-value]

    def _score_isolated(self, model: DalorraModel, reqs: list[ScoreRequest]) -> list[np.ndarray | Exception]:
        """One forward for the chunk; if it fails, each request again on its own, so an unexpected error
        (a bad input the checks missed, a bug) fails only the request that causes it."""
        try:
            return self._score_group(model, reqs)
        except Exception as exc:
            log.exception("scoring a chunk of %d requests failed; scoring them one by one", len(reqs))
            if len(reqs) == 1:
                return [exc]
        out: list[np.ndarray | Exception] = []
        for r in reqs:
            try:
                out += self._score_group(model, [r])
            except Exception as exc:
                out.append(exc)
        return out

    def _chunks(self, idx: list[int], requests: list[ScoreRequest]) -> list[list[int]]:
        """Split one adapter's requests into forwards of at most max_forward_rows rows (a request is never split).

        Measured on a 2-core CPU (bench/results/serve_latency.md): per-row cost grows with the batch (the cloze KV
        cache is copied K times per row), so very large forwards lose; on a GPU raise the setting.
        """
        limit = self.settings.max_forward_rows
        if self.settings.length_bucketing:  # similar lengths share a forward: less padding, same math
            idx = sorted(idx, key=lambda i: _length(requests[i]))
        chunks, cur, rows = [], [], 0
        for i in idx:
            if cur and rows + requests[i].rows > limit:
                chunks.append(cur)
                cur, rows = [], 0
            cur.append(i)
            rows += requests[i].rows
        return chunks + ([cur] if cur else [])

    def _score_group(self, model: DalorraModel, reqs: list[ScoreRequest]) -> list[np.ndarray]:
        """One forward for `reqs` (one adapter); a request the tokenizer refuses fails alone."""
        enc: list = []
        bad: dict[int, Exception] = {}
        for i, r in enumerate(reqs):  # a too-long request fails alone, with a 4xx
            try:
                enc += encode(
                    [Item(r.question, r.choices, None, context=r.context)],
                    model.tokenizer,
                    model.fmt,
                    strict=True,
                )
            except ValueError as exc:
                bad[i] = BackendError(str(exc))
            except Exception as exc:  # e.g. TypeError from the tokenizer on text it cannot encode
                bad[i] = BackendError(
                    f"this request's text cannot be tokenized ({type(exc).__name__}: {exc})"
                )
        if bad:
            good = [i for i in range(len(reqs)) if i not in bad]
            res = self._score_group(model, [reqs[i] for i in good]) if good else []
            merged: list = [bad.get(i) for i in range(len(reqs))]
            for i, x in zip(good, res, strict=True):
                merged[i] = x
            return merged
        # Rows, draws, clipping and MC-dropout seeding: adapters.scoring, as offline evaluation does.
        draws = [DrawRequest([e], r.samples, r.seed, r.first) for e, r in zip(enc, reqs, strict=True)]
        return [x[:, 0] for x in score_draws(model, draws)]  # (S'_i, K_i) each


def _length(r: ScoreRequest) -> int:
    """Characters of prompt plus the longest choice: a tokenizer-free proxy for the padded row length."""
    return len(r.question) + len(r.context or "") + sum(map(len, r.choices)) + max(map(len, r.choices))
