"""Hugging Face transformers backend (CPU or GPU): one base model, many adapters, mixed in one forward.

The base model is loaded once per process (adapters/multi.py: SharedBase); loading an adapter attaches its
factors and switch logits to the base's slots and unloading detaches them. A backend call's requests are grouped
by scoring path (prompt mode and letters), and each group runs as forwards of at most max_forward_rows rows in
which every row selects its own adapter and mask. Precision: the base in `dtype` (auto: bf16 where the hardware
has it), the adapters' factors in float32, softmax/entropy/MI in float32 or wider.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base, resolve_dtype
from adapters.data import Item
from adapters.multi import MixedView, SharedBase, mixed_key
from adapters.scoring import DrawRequest, Encoded, encode, score_draws

from .backend import Backend, BackendError, PromptLogprobs, Scored, ScoreRequest

if TYPE_CHECKING:
    from adapters.generate import OnToken
    from adapters.model import DalorraModel

    from .generation import GenerateRequest, GenerateResult
    from .settings import Settings

log = logging.getLogger("dalorra.hf")
Gate = Callable[[int], AbstractContextManager[object]]
PROMPT_CHUNK = 256  # prompt positions through lm_head at once: (256, V) float32 ≈ 50 MB for SmolLM2
MEAN_NETWORK = "mean-mask network (z = E[z])"


class HFBackend(Backend):
    name = "hf"

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.dtype = resolve_dtype(settings.dtype, settings.device)
        self.shared: SharedBase | None = None  # the one base model, loaded with the first adapter
        self.models: dict[str, DalorraModel] = {}  # adapter name → its factors attached to self.shared
        self.lock = threading.Lock()  # forwards and (de)attaching never overlap
        self.warmup_seconds: dict[str, float] = {}  # adapter → torch.compile + warm-up time (COMPILE=true)
        self.base_seconds: float | None = None  # time to load the base model

    # ---- adapters ---------------------------------------------------------------------------------
    def _base(self) -> SharedBase:
        if self.shared is None:
            t0 = time.perf_counter()
            base, tok = load_base(self.settings.base_model, device=self.settings.device, dtype=self.dtype)
            self.shared = SharedBase(base, tok, self.settings.base_model or "")
            self.base_seconds = time.perf_counter() - t0
            log.info("base model loaded once for every adapter (%s, %.1f s)", self.dtype, self.base_seconds)
        return self.shared

    def load_adapter(self, name: str, path: str) -> dict:
        shared = self._base()
        with self.lock:  # attaching may wrap base modules in slots: never during a forward
            model = load_adapter(
                path, shared.base, shared.tokenizer, self.settings.base_model or "", shared, torch.float32
            )
            model.eval()
        if self.settings.compile:
            self.warmup_seconds[name] = self._compile(model, name)
        with self.lock:  # only a warmed-up adapter becomes visible; a reload replaces the old factors
            old = self.models.get(name)
            self.models[name] = model
            if old is not None:
                shared.detach(old)
        return model.record

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            model = self.models.pop(name, None)
            if model is not None and self.shared is not None:
                self.shared.detach(model)

    def adapter_names(self) -> list[str]:
        return list(self.models)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: the base once, and every adapter's own tensors (factors, switch logits, fixed masks)."""
        out = {"base": self.shared.memory_bytes() if self.shared else 0}
        for name, m in self.models.items():
            own = [t for lay in m.adapted.values() for t in (lay.lora_A, lay.lora_B, lay.mask_logits)]
            own += list(m.fixed_masks.values())
            out[name] = sum(t.numel() * t.element_size() for t in own)
        return out

    @torch.no_grad()
    def _compile(self, model: DalorraModel, name: str) -> float:
        """torch.compile the graph-break-free parts of every decoder layer (MLP, RMSNorms; dynamic shapes) once for
        the shared base, and run warm-up batches so the compile cost is paid at load, not by the first user.

        Attention stays eager: its KV-cache objects break graphs (a whole-layer compile hit dynamo's recompile
        limit in a trial). Warm-up covers one row (a deterministic answer) and several rows, since dynamic
        shapes still specialise a dimension of size 1."""
        t0 = time.perf_counter()
        for layer in model.decoder.layers:
            for mod in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                if getattr(mod, "_compiled_call_impl", None) is None:
                    mod.compile(dynamic=True)
        if getattr(model.decoder.norm, "_compiled_call_impl", None) is None:
            model.decoder.norm.compile(dynamic=True)
        with self.lock:
            for rows in (1, max(2, self.settings.default_samples)):
                req = ScoreRequest(name, "Which warms the model up?", ("this one", "that one"), None, rows, 0)
                self._forward([(model, req, self._encode(model, req))])
        seconds = time.perf_counter() - t0
        log.info("adapter %s: torch.compile + warm-up took %.1f s", name, seconds)
        return seconds

    # ---- generation -------------------------------------------------------------------------------
    def _turn(self, adapter: str, gate: Gate | None) -> tuple[DalorraModel, Callable[[int], Iterator[None]]]:
        """The adapter's model and turn(rows): the scheduler's turn (gate) and the backend lock for one piece of
        work, refused if the adapter was unloaded or reloaded meanwhile."""
        model = self.models.get(adapter)
        if model is None:
            raise BackendError(f"adapter {adapter!r} is not loaded")

        @contextmanager
        def turn(rows: int) -> Iterator[None]:
            outer = gate(rows) if gate is not None else _null()
            with outer, self.lock:
                if self.models.get(adapter) is not model:
                    raise BackendError(f"adapter {adapter!r} was unloaded during the request")
                yield

        return model, turn

    def generate(
        self,
        request: GenerateRequest,
        on_token: OnToken | None = None,
        cancelled: Callable[[], bool] | None = None,
        gate: Gate | None = None,
    ) -> GenerateResult:
        """Text generation (server/hf_generate.py). Every forward — each decoding step, each piece of the
        uncertainty pass — runs inside gate(rows) (the scheduler's turn) and the backend lock."""
        from .hf_generate import generate

        model, turn = self._turn(request.adapter, gate)
        return generate(
            model, request, turn, self.settings.max_prompt_tokens, on_token, cancelled or (lambda: False)
        )

    @torch.no_grad()
    def prompt_logprobs(
        self, adapter: str, token_ids: Sequence[int], top_k: int, gate: Gate | None = None
    ) -> PromptLogprobs:
        """log p(x_t | x_<t) of every prompt token under the mean-mask network (z = E[z], the network that
        decodes): one teacher-forced forward of one row inside one scheduler turn, then lm_head and the
        log-softmax over the vocabulary in PROMPT_CHUNK positions."""
        from adapters.generate import ROW_TOKENS, mean_masks

        model, turn = self._turn(adapter, gate)
        ids = [int(t) for t in token_ids]
        vocab = model.base.get_input_embeddings().num_embeddings
        if not ids:
            raise BackendError("the prompt is empty")
        if len(ids) > self.settings.max_prompt_tokens:
            raise BackendError(
                f"prompt is {len(ids)} tokens; at most {self.settings.max_prompt_tokens} (DALORRA_MAX_PROMPT_TOKENS)"
            )
        if min(ids) < 0 or max(ids) >= vocab:
            raise BackendError(f"token id {max(ids)} is outside the vocabulary (0 to {vocab - 1})")
        device = next(model.base.parameters()).device
        x = torch.tensor([ids], device=device)  # (1, L)
        chosen, tops = [], []
        # rows: the forward plus lm_head over the whole vocabulary at every position (as adapters.generate counts)
        with turn(math.ceil(1.3 * len(ids) / ROW_TOKENS)), model.row_masks(mean_masks(model), x.new_zeros(1)):
            hidden = model.decoder(input_ids=x, use_cache=False).last_hidden_state[0]  # (L, d)
            for a in range(0, len(ids) - 1, PROMPT_CHUNK):
                b = min(len(ids) - 1, a + PROMPT_CHUNK)
                # (b−a, V): p(x_{t+1} | x_≤t); lm_head sees one row (its mask row) of b−a positions
                lp = torch.log_softmax(model.lm_head(hidden[None, a:b])[0].float(), -1)
                chosen += lp.gather(-1, x[0, a + 1 : b + 1, None])[:, 0].tolist()
                if top_k:
                    v, j = lp.topk(top_k, -1)  # (b−a, k)
                    tops += list(zip(j.tolist(), v.tolist(), strict=True))
        tok = model.tokenizer
        texts = tok.batch_decode([[t] for t in ids])
        top: list[list[tuple[str, float]] | None] = [None]
        for t in range(len(ids) - 1):
            if not top_k:
                top.append([])
                continue
            js, vs = tops[t]
            top.append(list(zip(tok.batch_decode([[j] for j in js]), vs, strict=True)))
        return PromptLogprobs(texts, [None, *chosen], top, MEAN_NETWORK)

    def tokenizer(self, adapter: str) -> Any | None:
        model = self.models.get(adapter)
        return model.tokenizer if model is not None else None

    # ---- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[Scored | Exception]:
        out: list[Scored | Exception | None] = [None] * len(requests)
        with self.lock:
            groups: dict[tuple, list[tuple[int, DalorraModel, Encoded]]] = {}
            for i, r in enumerate(requests):
                model = self.models.get(r.adapter)
                if model is None:
                    out[i] = BackendError(f"adapter {r.adapter!r} is not loaded")
                    continue
                try:  # a request the tokenizer refuses fails alone, with a 4xx
                    enc = self._encode(model, r)
                except BackendError as exc:
                    out[i] = exc
                    continue
                groups.setdefault(mixed_key(model.fmt), []).append((i, model, enc))
            for members in groups.values():
                for chunk in self._chunks(members, requests):
                    work = [(m, requests[i], e) for i, m, e in chunk]
                    for (i, _, _), res in zip(chunk, self._forward_isolated(work), strict=True):
                        out[i] = res
        return out  # type: ignore[return-value]

    @staticmethod
    def _encode(model: DalorraModel, r: ScoreRequest) -> Encoded:
        try:
            return encode(
                [Item(r.question, r.choices, None, context=r.context)], model.tokenizer, model.fmt, True
            )[0]
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        except Exception as exc:  # e.g. TypeError from the tokenizer on text it cannot encode
            raise BackendError(
                f"this request's text cannot be tokenized ({type(exc).__name__}: {exc})"
            ) from None

    def _forward_isolated(
        self, work: list[tuple[DalorraModel, ScoreRequest, Encoded]]
    ) -> list[Scored | Exception]:
        """One forward for the chunk; if it fails, each request again on its own, so an unexpected error
        (a bad input the checks missed, a bug) fails only the request that causes it."""
        try:
            return self._forward(work)
        except Exception as exc:
            log.exception("scoring a chunk of %d requests failed; scoring them one by one", len(work))
            if len(work) == 1:
                return [exc]
        out: list[Scored | Exception] = []
        for w in work:
            try:
                out += self._forward([w])
            except Exception as exc:
                out.append(exc)
        return out

    def _forward(self, work: list[tuple[DalorraModel, ScoreRequest, Encoded]]) -> list[Scored]:
        """Rows of every request, each under its own adapter and masks, in one forward (adapters.scoring)."""
        draws = [DrawRequest([e], r.samples, r.seed, r.first) for _, r, e in work]
        models = list({id(m): m for m, _, _ in work}.values())
        if len(models) == 1:
            got = score_draws(models[0], draws)
        else:
            got = score_draws(MixedView(self.shared, models), draws, adapters=[m for m, _, _ in work])
        return [Scored(x[:, 0]) for x in got]  # (S'_i, K_i) each

    def _chunks(
        self, members: list[tuple[int, DalorraModel, Encoded]], requests: list[ScoreRequest]
    ) -> list[list[tuple[int, DalorraModel, Encoded]]]:
        """Split a group's requests into forwards of at most max_forward_rows rows (a request is never split).

        Measured on a 2-core CPU (bench/results/serve_latency.md): per-row cost grows with the batch (the cloze KV
        cache is copied K times per row), so very large forwards lose; on a GPU raise the setting.
        """
        limit = self.settings.max_forward_rows
        if self.settings.length_bucketing:  # similar lengths share a forward: less padding, same math
            members = sorted(members, key=lambda m: _length(requests[m[0]]))
        chunks, cur, rows = [], [], 0
        for m in members:
            r = requests[m[0]].rows
            if cur and rows + r > limit:
                chunks.append(cur)
                cur, rows = [], 0
            cur.append(m)
            rows += r
        return chunks + ([cur] if cur else [])


@contextmanager
def _null() -> Iterator[None]:
    yield


def _length(r: ScoreRequest) -> int:
    """Characters of prompt plus the longest choice: a tokenizer-free proxy for the padded row length."""
    return len(r.question) + len(r.context or "") + sum(map(len, r.choices)) + max(map(len, r.choices))
