"""The trainer: DALorRA (negative ELBO) and the baselines, on multiple-choice JSONL, resumable.

Loss per step (DESIGN §1):  mean_batch CE(softmax over the K choice logits, y)  +  λ(step) · KL / N
with one straight-through binary-Concrete mask draw per example. Baselines share everything else:
  lora       MLE LoRA (masks all on)             map        + weight decay on A, B
  mcdropout  LoRA dropout 0.1, sampled at test   ensemble   N independent LoRAs, probabilities averaged
Multi-process (torchrun / accelerate launch, gloo or nccl): each rank takes its share of every batch and
gradients are averaged; rank 0 writes checkpoints and the adapter.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .adapter_io import RECORD, load_adapter, read_record, save_adapter, write_json_atomic
from .basemodel import load_base, resolve_name
from .config import AdapterConfig, PromptFormat
from .data import DataError, Item, load_jsonl, split
from .decision import fit_decision, split_calibration
from .evaluate import evaluate_logits, predict_logits
from .model import DalorraModel
from .scoring import choice_logits, encode
from .short_answers import (
    DECISION_FILE,
    SHORT_ANSWER,
    decision_summary,
    fit_generation_thresholds,
    short_answer_items,
)

log = logging.getLogger("dalorra.train")


def _opt(default: object = MISSING, help: str = "", **kw: Any) -> Any:
    """A TrainConfig field with its one-line help (`dalorra train --help` is generated from these)."""
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run does, written into the adapter it produces (dalorra.json `training.config`).
    Each field is one `dalorra train --flag` (underscores become dashes) with the help text given here."""

    out: str = _opt(help="adapter directory to write (atomically); checkpoints go to <out>.ckpt/")
    train: str = _opt(
        "arc_easy/train", "training JSONL (path, or name/split under the data directory, e.g. arc_easy/train)"
    )
    validation: str | None = _opt(None, "validation JSONL, evaluated every --eval-every steps (optional)")
    calibration: str | None = _opt(
        None,
        "calibration JSONL for temperature, abstention and generation thresholds "
        "(default: --calib-fraction of train)",
    )
    calib_fraction: float = _opt(
        0.1, "share of the training file held out for calibration when no file is given"
    )
    base_model: str | None = _opt(
        None, "HF model id or local directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    method: str = _opt("dalorra", "dalorra | lora (MLE) | map (weight decay) | mcdropout | ensemble")
    r: int = _opt(8, "LoRA rank")
    alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r)")
    targets: tuple[str, ...] = _opt(
        ("q_proj", "v_proj", "lm_head"), "module-name suffixes to adapt (comma-separated)"
    )
    top_layers: int | None = _opt(None, "adapt only the top L decoder layers (default: all)")
    p0: float = _opt(0.5, "prior keep-probability of each rank component")
    tau: float = _opt(2.0 / 3.0, "binary-Concrete temperature")
    hard: bool = _opt(True, "straight-through hard masks during training (true/false)")
    mask_sharing: str = _opt(
        "module",
        "which modules share one switch per rank index: module (the paper: none), "
        "rank (all layers of a module kind), layer (q_proj and v_proj of one layer)",
    )
    train_samples: int = _opt(
        1, "mask draws per example per step (DALorRA; the likelihood is averaged over them)"
    )
    lr: float = _opt(1e-4, "learning rate of A and B")
    lr_mask: float = _opt(1e-2, "learning rate of the mask logits φ")
    mask_schedule: str = _opt(
        "linear", "φ's schedule: linear (warm-up + decay, like A/B) or constant (after warm-up)"
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay on A and B (method map: 0.01 when 0)")
    kl_weight: float = _opt(1.0, "weight λ of KL/N in the loss")
    kl_warmup: float = _opt(0.0, "fraction of steps over which λ rises linearly from 0")
    steps: int = _opt(300, "optimiser steps")
    batch_size: int = _opt(8, "questions per step")
    grad_accum: int = _opt(1, "micro-batches per step (batch_size must divide by it)")
    warmup: float = _opt(0.06, "linear warm-up, as a fraction of steps")
    mode: str = _opt("cloze", "scoring mode: cloze | letter")
    normalize: str = _opt("tokens", "cloze logit: none (summed log-prob) | tokens | chars")
    max_length: int = _opt(256, "max prompt tokens")
    seed: int = _opt(0, "random seed (init, masks, data order)")
    ensemble_size: int = _opt(3, "members of method=ensemble")
    eval_every: int = _opt(100, "validate every N steps")
    eval_limit: int = _opt(200, "validation items used")
    eval_samples: int = _opt(
        10, "mask samples S at evaluation and calibration (the adapter's default S when served)"
    )
    save_every: int = _opt(50, "checkpoint every N steps")
    train_limit: int | None = _opt(None, "read only the first N rows of the training file (before the split)")
    train_items: int | None = _opt(
        None,
        "train on only the first N items left after the calibration split "
        "(several epochs over a capped set in the same steps: the paper's regime); "
        "the calibration split is unchanged",
    )
    target_error: float = _opt(
        0.2, "abstention: selective error target on the calibration split (choices and generated answers)"
    )
    target_delta: float = _opt(0.1, "abstention: the target holds with confidence 1 − delta")
    conformal_alpha: float = _opt(0.1, "prediction sets aim at coverage 1 − alpha")
    unfamiliar_alpha: float = _opt(
        0.05,
        "abstention: an input whose unfamiliarity p-value is below this must pass stricter thresholds "
        "(in-distribution inputs fall below it at rate ≤ this)",
    )
    calibrate: bool = _opt(
        True, "fit abstention thresholds and the conformal quantile on the calibration split (true/false)"
    )
    temperature_scaling: bool = _opt(
        True,
        "fit one temperature by NLL on the calibration split, stored in "
        "dalorra.json and applied to every mask's choice logits before "
        "averaging (true/false)",
    )
    generation_items: int = _opt(
        60,
        "fit the thresholds for generated answers on up to N short-answer questions "
        "of the calibration split, written to generation_decision.json (0: skip)",
    )
    generation_max_tokens: int = _opt(16, "longest generated answer when fitting the generation thresholds")
    stop_at: int | None = _opt(None, "stop after this step (time-boxed jobs); continue later with --resume")
    progress: bool = _opt(True, "show progress bars")
    extra: dict = field(default_factory=dict)  # free-form notes kept in the record; not a command-line option

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.train_samples < 1:
            raise ValueError("steps, batch_size, grad_accum and train_samples must be >= 1")
        if self.mask_schedule not in ("linear", "constant"):
            raise ValueError(f"mask_schedule={self.mask_schedule!r}: linear or constant")
        if self.lr <= 0 or self.lr_mask <= 0:
            raise ValueError("learning rates must be > 0")
        if not 0 <= self.warmup < 1 or not 0 <= self.kl_warmup <= 1:
            raise ValueError("warmup and kl_warmup are fractions of the steps")
        if self.generation_items < 0 or self.generation_max_tokens < 1:
            raise ValueError(
                f"generation_items={self.generation_items} must be >= 0 (0 skips the generation "
                f"thresholds) and generation_max_tokens={self.generation_max_tokens} >= 1"
            )

    def adapter_config(self, n_layers: int) -> AdapterConfig:
        layers = None if self.top_layers is None else tuple(range(n_layers - self.top_layers, n_layers))
        return AdapterConfig(
            method=self.method,
            r=self.r,
            alpha=self.alpha,
            targets=self.targets,
            layers=layers,
            p0=self.p0,
            tau=self.tau,
            hard=self.hard,
            mask_sharing=self.mask_sharing,
            dropout=0.1 if self.method == "mcdropout" else 0.0,
            stochastic=self.method == "dalorra",
        )

    @classmethod
    def options(cls) -> list[Field]:
        """The fields that are `dalorra train` flags (all but `extra`), each with metadata["help"]."""
        return [f for f in fields(cls) if f.name != "extra"]

    def calibration_name(self) -> str:
        return self.calibration or f"{self.calib_fraction:.0%} of {self.train}"

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(mode=self.mode, normalize=self.normalize, max_length=self.max_length)


class Interrupted(RuntimeError):
    """Training stopped early on purpose (--stop-at); the checkpoint allows --resume."""


def _dist() -> tuple[int, int]:
    """(rank, world) from torchrun/accelerate environment variables; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def _lr_lambda(total: int, warmup: float, constant: bool = False) -> Callable[[int], float]:
    w = max(1, int(round(warmup * total)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 1.0 if constant else max(0.0, (total - step) / max(1, total - w))

    return f


def load_splits(cfg: TrainConfig) -> tuple[list[Item], list[Item] | None, list[Item]]:
    train = load_jsonl(cfg.train, limit=cfg.train_limit)
    if cfg.calibration:
        calib = load_jsonl(cfg.calibration)
    else:
        train, calib = split(train, cfg.calib_fraction, cfg.seed)
    if cfg.train_items is not None:
        train = train[: cfg.train_items]
    val = load_jsonl(cfg.validation, limit=cfg.eval_limit) if cfg.validation else None
    return train, val, calib


def _batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Data order is a pure function of (seed, step): resume needs no saved sampler state."""
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * batch : (pos + 1) * batch]


def train_one(
    cfg: TrainConfig, seed: int, ckpt_path: Path, resume: bool, rank: int = 0, world: int = 1
) -> tuple[DalorraModel, dict]:
    """Train one adapter; returns (model, train summary). Checkpoints to ckpt_path every save_every steps."""
    torch.manual_seed(seed)
    random.seed(seed)
    base, tok = load_base(cfg.base_model)
    n_layers = base.config.num_hidden_layers
    model = DalorraModel(
        base,
        tok,
        cfg.adapter_config(n_layers),
        cfg.prompt_format(),
        base_name=resolve_name(cfg.base_model),
        seed=seed,
    )
    train, val, _ = load_splits(cfg)
    if len(train) < cfg.batch_size:
        raise DataError(f"{cfg.train}: {len(train)} training items, fewer than one batch of {cfg.batch_size}")
    enc = encode(train, tok, model.fmt)
    labels = torch.tensor([it.label for it in train])
    N = len(train)
    wd = cfg.weight_decay or (0.01 if cfg.method == "map" else 0.0)
    groups = [{"params": list(model.lora_parameters()), "lr": cfg.lr, "weight_decay": wd}]
    if cfg.method == "dalorra":
        groups.append({"params": list(model.mask_parameters()), "lr": cfg.lr_mask, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    lambdas = [_lr_lambda(cfg.steps, cfg.warmup)]
    if cfg.method == "dalorra":
        lambdas.append(_lr_lambda(cfg.steps, cfg.warmup, constant=cfg.mask_schedule == "constant"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    params = [p for g in groups for p in g["params"]]
    step, history, t_train = 0, [], 0.0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True)
        with torch.no_grad():
            for p, v in zip(params, ck["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        step, history, t_train = ck["step"], json.loads(ck["history"]), float(ck["t_train"])
        log.info("resumed %s at step %d", ckpt_path, step)
    model.train()
    micro = cfg.batch_size // cfg.grad_accum
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"train {cfg.method}",
        disable=not cfg.progress or rank != 0,
        dynamic_ncols=True,
    )
    while step < cfg.steps:
        if cfg.stop_at is not None and step >= cfg.stop_at:
            raise Interrupted(f"stopped at step {step} (--stop-at); continue with --resume")
        t0 = time.perf_counter()
        idx = _batch_indices(N, cfg.batch_size, step, seed)
        opt.zero_grad(set_to_none=True)
        lam = cfg.kl_weight * (min(1.0, step / (cfg.kl_warmup * cfg.steps)) if cfg.kl_warmup > 0 else 1.0)
        nll_sum = 0.0
        for a in range(cfg.grad_accum):
            part = idx[a * micro : (a + 1) * micro][rank::world]  # this rank's share of the micro-batch
            if not part:
                continue
            M = cfg.train_samples if cfg.method == "dalorra" else 1
            rows = part * M  # M mask draws per example (R = M·len(part) rows)
            masks = model.concrete_masks(len(rows))
            logits = choice_logits(model, enc, rows, masks, torch.arange(len(rows)))  # (R, Kmax)
            nll = F.cross_entropy(logits, labels[rows], reduction="sum") / (cfg.batch_size * M)
            nll.backward()
            nll_sum += float(nll.detach())
        kl = model.kl()
        kl_value = float(kl.detach())
        if kl.requires_grad:  # KL/N per example; every rank adds 1/world of it, the all-reduce sums
            (lam * kl / N / world).backward()
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        opt.step()
        sched.step()
        step += 1
        t_train += time.perf_counter() - t0
        keep = float(torch.cat([lay.keep_prob.detach() for lay in model.adapted.values()]).mean())
        history.append({"step": step, "nll": nll_sum * world, "kl_per_n": kl_value / N, "keep": keep})
        bar.set_postfix(
            loss=f"{nll_sum * world + lam * kl_value / N:.3f}",
            nll=f"{nll_sum * world:.3f}",
            kl=f"{kl_value / N:.1e}",
            keep=f"{keep:.2f}",
        )
        bar.update(1)
        # The final step's validation is run() 's own, after calibration: not done twice.
        if val is not None and rank == 0 and step % cfg.eval_every == 0 and step < cfg.steps:
            m = evaluate_logits(
                predict_logits(model, val, cfg.eval_samples, seed=seed, progress=False),
                np.array([it.label for it in val]),
            )
            history[-1]["val"] = {k: m[k] for k in ("acc", "ece", "nll")}
            bar.write(f"step {step}: val acc {m['acc']:.3f} ece {m['ece']:.3f} nll {m['nll']:.3f}")
            model.train()
        if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
            ckpt = {
                "params": [p.detach().clone() for p in params],
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
                "history": json.dumps(history),
                "t_train": t_train,
            }
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
            torch.save(ckpt, tmp)
            os.replace(tmp, ckpt_path)
    bar.close()
    model.eval()
    summary = {
        "steps": cfg.steps,
        "train_items": N,
        "seed": seed,
        "train_seconds": round(t_train, 2),
        "seconds_per_step": round(t_train / max(1, len(history)), 4),
        "world_size": world,
        "final_nll": float(np.mean([h["nll"] for h in history[-20:]])),
        "history": history[-200:],
    }
    return model, summary


def _merge_ensemble(members: list[DalorraModel], cfg: TrainConfig) -> DalorraModel:
    """N rank-r LoRAs = one rank N·r LoRA whose sample s keeps only member (s mod N)'s block of components."""
    n, r = len(members), cfg.r
    base, tok = load_base(cfg.base_model)
    acfg = AdapterConfig(
        **{
            **members[0].cfg.to_dict(),
            "r": n * r,
            "alpha": n * cfg.alpha,
            "stochastic": False,
            "method": "ensemble",
        }
    )
    merged = DalorraModel(base, tok, acfg, members[0].fmt, base_name=members[0].base_name)
    blocks = torch.zeros(n, n * r)
    for m in range(n):
        blocks[m, m * r : (m + 1) * r] = 1.0
    with torch.no_grad():
        for name, layer in merged.adapted.items():
            layer.lora_A.copy_(torch.cat([mm.adapted[name].lora_A for mm in members], 0))
            layer.lora_B.copy_(torch.cat([mm.adapted[name].lora_B for mm in members], 1))
            merged.fixed_masks[name] = blocks.clone()
    return merged


def run(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (with checkpoints under <out>.ckpt/), calibrate decisions, write the adapter. Returns its record."""
    rank, world = _dist()
    out = Path(cfg.out)
    ckpt_dir = out.with_name(out.name + ".ckpt")
    if cfg.method == "ensemble":
        members, summaries = [], []
        for m in range(cfg.ensemble_size):
            member_cfg = TrainConfig(**{**asdict(cfg), "method": "lora", "out": str(out) + f".member{m}"})
            mm, s = train_one(
                member_cfg, cfg.seed + 1000 * m, ckpt_dir / f"member{m}.pt", resume, rank, world
            )
            members.append(mm)
            summaries.append(s)
        model = _merge_ensemble(members, cfg)
        summary = {
            **summaries[0],
            "train_seconds": sum(s["train_seconds"] for s in summaries),
            "members": len(members),
            "history": summaries[0]["history"],
        }
    else:
        model, summary = train_one(cfg, cfg.seed, ckpt_dir / "state.pt", resume, rank, world)
    if rank != 0:
        torch.distributed.barrier()  # rank 0 calibrates and writes the adapter
        return {}
    _, val, calib = load_splits(cfg)
    record = {
        "training": {**summary, "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}},
        "default_samples": cfg.eval_samples,
        "keep_histogram": keep_histogram(model),
    }
    split_name = cfg.calibration_name()
    fitted, decision, T = fit_calibration(model, calib, split_name, cfg)
    record.update(fitted)
    if val is not None:
        record["validation"] = evaluate_logits(
            predict_logits(model, val, cfg.eval_samples, seed=0, progress=cfg.progress, desc="validate") / T,
            np.array([it.label for it in val]),
            decision,
        )
    files = {}
    if cfg.calibrate and cfg.generation_items > 0:  # thresholds for generated answers, on the same split
        if short_answer_items(calib, 1):
            generation = fit_generation_thresholds(
                model,
                calib,
                adapter=out.name,
                source=split_name,
                limit=cfg.generation_items,
                samples=cfg.eval_samples,
                target_error=cfg.target_error,
                delta=cfg.target_delta,
                max_tokens=cfg.generation_max_tokens,
                progress=cfg.progress,
            )
            files[DECISION_FILE] = generation  # beside dalorra.json, where the server looks for it
            record["generation_decision"] = {"file": DECISION_FILE, **decision_summary(generation)}
        else:  # e.g. WinoGrande: fill-in-the-blank options, no question answered in a few words
            log.warning(
                "no short-answer items in the calibration split (%s): generation thresholds not fitted; "
                "generated answers from this adapter are always answered",
                split_name,
            )
            record["generation_decision"] = {
                "file": None,
                "skipped": f"no short-answer items ({SHORT_ANSWER})",
            }
    save_adapter(model, out, extra=record, files=files)
    if ckpt_dir.exists():
        write_json_atomic(ckpt_dir / "done.json", {"adapter": str(out)})
    if world > 1:
        torch.distributed.barrier()
    return record


def fit_calibration(
    model: DalorraModel, calib: list[Item], split_name: str, cfg: TrainConfig
) -> tuple[dict, dict | None, float]:
    """Score the calibration split at S = cfg.eval_samples and fit on it (decision.fit_decision): one temperature
    by NLL on its temperature part (cfg.temperature_scaling), then, on the disjoint decision part at that
    temperature, the jointly certified abstention policy, its unfamiliarity reference and the conformal quantile
    (cfg.calibrate). Returns (the record's fields: temperature, temperature_fit, decision, calibration; the
    decision; T)."""
    fitted: dict = {}
    if not (cfg.calibrate or cfg.temperature_scaling):
        return fitted, None, 1.0
    calib_logits = predict_logits(
        model, calib, cfg.eval_samples, seed=0, progress=cfg.progress, desc="calibrate"
    )
    calib_labels = np.array([it.label for it in calib])
    T, temp, decision = fit_decision(
        calib_logits,
        calib_labels,
        cfg.target_error,
        cfg.target_delta,
        cfg.conformal_alpha,
        cfg.unfamiliar_alpha,
        cfg.temperature_scaling,
        cfg.seed,
    )
    if cfg.temperature_scaling:  # one T for every mask's logits; thresholds come after it, on other items
        fitted["temperature"] = T
        fitted["temperature_fit"] = {"split": split_name, "part": "temperature part", **temp}
    if not cfg.calibrate:
        return fitted, None, T
    fitted["decision"] = decision
    d_idx = (
        split_calibration(len(calib), cfg.seed)[1] if cfg.temperature_scaling and len(calib) >= 2 else None
    )
    d_logits = calib_logits if d_idx is None else calib_logits[:, d_idx]
    fitted["calibration"] = {
        "split": split_name,
        "part": "decision part" if d_idx is not None else "all",
        "metrics": evaluate_logits(
            d_logits / T, calib_labels if d_idx is None else calib_labels[d_idx], decision
        ),
    }
    return fitted, decision, T


def recalibrate(adapter_dir: str | os.PathLike, base_model: str | None = None, **overrides: Any) -> dict:
    """Fit an existing adapter's temperature and thresholds again, as `dalorra train` would have at its end, and
    rewrite its dalorra.json atomically (the weights are untouched).

    The calibration split is rebuilt from the training config stored in the record (the same seeded split, so no
    item it trained on is used); `overrides` replace TrainConfig fields (e.g. calibration=JSONL, eval_samples —
    which also becomes the adapter's served default_samples, the S its thresholds were fitted at —
    target_error, temperature_scaling=False to remove a temperature); the thresholds are always fitted again, after
    the temperature. The validation metrics are re-scored at the new temperature when the record has them or a
    validation split is given (validation=, eval_limit=). For adapters trained before temperature scaling existed,
    or to refit on another calibration set."""
    d = Path(adapter_dir)
    record = read_record(d)
    stored = (record.get("training") or {}).get("config")
    if not stored:
        raise ValueError(f"{d}: its {RECORD} has no training config, so its calibration split is unknown")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    conf = {k: v for k, v in stored.items() if k in known}
    conf["targets"] = tuple(conf.get("targets") or ())
    conf.update({"out": str(d), "temperature_scaling": True})
    conf.update({k: v for k, v in overrides.items() if v is not None})
    conf["calibrate"] = True  # thresholds fitted at another temperature would no longer hold
    if base_model is not None:
        conf["base_model"] = base_model
    cfg = TrainConfig(**conf)
    base, tok = load_base(cfg.base_model)
    model = load_adapter(d, base, tok, cfg.base_model or "")
    _, val, calib = load_splits(cfg)
    split_name = cfg.calibration_name()
    fitted, decision, T = fit_calibration(model, calib, split_name, cfg)
    new = {k: v for k, v in record.items() if k not in ("temperature", "temperature_fit")}
    new.update(fitted)
    if val is not None and ("validation" in record or overrides.get("validation")):
        new["validation"] = evaluate_logits(
            predict_logits(model, val, cfg.eval_samples, seed=0, progress=cfg.progress, desc="validate") / T,
            np.array([it.label for it in val]),
            new.get("decision"),
        )
    new["default_samples"] = (
        cfg.eval_samples
    )  # the thresholds hold at the S they were fitted at: serve that S
    new["recalibrated"] = {
        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "split": split_name,
        "items": len(calib),
        "samples": cfg.eval_samples,
        "temperature_before": float(record.get("temperature", 1.0)),
        "temperature": T,
    }
    write_json_atomic(d / RECORD, new)
    return new


def keep_histogram(model: DalorraModel, bins: int = 10) -> dict[str, list[int]]:
    """Histogram of σ(φ) per module kind on [0, 1] (the method's own evidence that φ moved)."""
    return {
        k: np.histogram(v, bins=bins, range=(0, 1))[0].tolist() for k, v in model.keep_probabilities().items()
    }
