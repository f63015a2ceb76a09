"""`dalorra train`, `dalorra eval` and `dalorra convert` (the `dalorra` entry point, dalorra/cli.py, adds serve
and predict). `python -m adapters.cli train ...` also works, for torchrun and accelerate launch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

TRAIN_HELP = {
    "out": "adapter directory to write (atomically); checkpoints go to <out>.ckpt/",
    "train": "training JSONL (path, or name/split under the data directory, e.g. arc_easy/train)",
    "validation": "validation JSONL, evaluated every --eval-every steps (optional)",
    "calibration": "calibration JSONL for abstention thresholds (default: --calib-fraction of train)",
    "calib_fraction": "share of the training file held out for decision calibration",
    "base_model": "HF model id or local directory (default: the embedded SmolLM2-135M-Instruct)",
    "method": "dalorra | lora (MLE) | map (weight decay) | mcdropout | ensemble",
    "r": "LoRA rank", "alpha": "LoRA alpha (scale = alpha / r)",
    "targets": "module-name suffixes to adapt (comma-separated)",
    "top_layers": "adapt only the top L decoder layers (default: all)",
    "p0": "prior keep-probability of each rank component", "tau": "binary-Concrete temperature",
    "hard": "straight-through hard masks during training (true/false)",
    "mask_sharing": "which modules share one switch per rank index: module (the paper: none), rank (all layers of "
                    "a module kind), layer (q_proj and v_proj of one layer)",
    "train_items": "train on only the first N items left after the calibration split (several epochs over a capped "
                   "set in the same steps); the calibration split is unchanged",
    "train_samples": "mask draws per example per step (DALorRA; the likelihood is averaged over them)",
    "lr": "learning rate of A and B", "lr_mask": "learning rate of the mask logits φ",
    "mask_schedule": "φ's schedule: linear (warm-up + decay, like A/B) or constant (after warm-up)",
    "weight_decay": "AdamW weight decay on A and B (method map: 0.01 when 0)",
    "kl_weight": "weight λ of KL/N in the loss", "kl_warmup": "fraction of steps over which λ rises from 0",
    "steps": "optimiser steps", "batch_size": "questions per step",
    "grad_accum": "micro-batches per step (batch_size must divide by it)",
    "warmup": "linear warm-up, as a fraction of steps", "mode": "scoring mode: cloze | letter",
    "normalize": "cloze logit: none (summed log-prob) | tokens | chars", "max_length": "max prompt tokens",
    "seed": "random seed (init, masks, data order)", "ensemble_size": "members of method=ensemble",
    "eval_every": "validate every N steps", "eval_limit": "validation items used",
    "eval_samples": "mask samples S at evaluation", "save_every": "checkpoint every N steps",
    "train_limit": "use only the first N training items", "target_error": "abstention: selective error target",
    "target_delta": "abstention: the target holds with confidence 1 − delta",
    "conformal_alpha": "prediction sets aim at coverage 1 − alpha", "progress": "show a progress bar",
    "calibrate": "fit abstention thresholds and the conformal quantile on the calibration split (true/false)",
    "temperature_scaling": "fit one temperature by NLL on the calibration split, stored in dalorra.json and "
                           "applied to every mask's choice logits before averaging (true/false)",
    "stop_at": "stop after this step (time-boxed jobs); continue later with --resume",
}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_train(sub) -> None:
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a DALorRA (or baseline) adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kind = {"int": int, "float": float, "bool": _bool}.get(str(f.type).split(" ")[0].replace("None", "")
                                                                .strip("| "), str)
        if f.name == "targets":
            p.add_argument(flag, default=",".join(default), help=TRAIN_HELP[f.name])
        else:
            p.add_argument(flag, type=kind, default=default, required=f.default is MISSING, help=TRAIN_HELP[f.name])
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt/ exactly where it stopped")
    p.set_defaults(func=_reporting_errors(_cmd_train))


def _cmd_train(a) -> int:
    from .train import TrainConfig, run

    kw = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if f.name != "extra"}
    kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
    rec = run(TrainConfig(**kw), resume=a.resume)
    if rec:
        v = rec.get("validation") or (rec.get("calibration") or {}).get("metrics") or {}
        print(json.dumps({"adapter": a.out, **{k: v.get(k) for k in ("acc", "ece", "nll")}}))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate adapters on a JSONL: ACC, ECE, NLL, Brier, AURC, decisions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter directories ('none' = the base model zero-shot)")
    p.add_argument("--data", required=True, action="append", help="JSONL to evaluate on (repeatable)")
    p.add_argument("--base-model", default=None, help="base model (default: embedded SmolLM2)")
    p.add_argument("--samples", type=int, default=10, help="mask samples S")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward")
    p.add_argument("--mode", choices=["letter", "cloze"], default=None, help="zero-shot scoring mode ('none')")
    p.add_argument("--out-dir", default=None, help="write predictions JSONL, metrics JSON and PNG plots here")
    p.set_defaults(func=_reporting_errors(_cmd_eval))


def _cmd_eval(a) -> int:
    import numpy as np

    from .adapter_io import load_adapter, write_json_atomic
    from .basemodel import load_base
    from .config import AdapterConfig, PromptFormat
    from .data import load_jsonl
    from .evaluate import evaluate_logits, plot_reliability, predict_logits, write_predictions
    from .model import DalorraModel
    from .uncertainty import summarize

    results = []
    for ad in a.adapters:
        base, tok = load_base(a.base_model)
        if ad == "none":
            model = DalorraModel(base, tok, AdapterConfig(), PromptFormat(mode=a.mode or "cloze"))
            model.set_mask_mode("off")
            decision, T = None, 1.0
        else:
            model = load_adapter(ad, base, tok, a.base_model or "")
            decision = model.record.get("decision")
            T = float(model.record.get("temperature", 1.0))  # the fitted temperature, as the server applies it
        for data in a.data:
            items = load_jsonl(data, limit=a.limit)
            logits = predict_logits(model, items, a.samples, a.seed, a.batch_size, desc=Path(data).stem) / T
            labels = np.array([it.label for it in items])
            m = {"adapter": ad, "data": data, "samples": a.samples, "temperature": T, **evaluate_logits(logits, labels, decision)}
            results.append(m)
            print(json.dumps(m))
            if a.out_dir:
                od = Path(a.out_dir)
                od.mkdir(parents=True, exist_ok=True)
                stem = f"{Path(ad).name}__{Path(data).parent.name}_{Path(data).stem}"
                write_predictions(od / f"{stem}.predictions.jsonl", items, logits)
                _plot_or_warn(plot_reliability, od / f"{stem}.png", summarize(logits)["probabilities"], labels, stem)
    if a.out_dir:
        write_json_atomic(Path(a.out_dir) / "metrics.json", results)
    return 0


def _plot_or_warn(plot, path: Path, probs, labels, title: str) -> bool:
    """The reliability plot needs matplotlib (an optional extra); without it the metrics are still written."""
    try:
        plot(path, probs, labels, title)
    except ImportError as exc:
        print(f"dalorra eval: {exc.name or 'matplotlib'} is not installed, so {path.name} was skipped; the metrics "
              "and predictions are written (pip install matplotlib for the plots)", file=sys.stderr)
        return False
    return True


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert the embedded GGUF model to the float cache now")
    p.add_argument("--base-model", default=None)
    p.set_defaults(func=_reporting_errors(_cmd_convert))


def _cmd_convert(a) -> int:
    from .basemodel import local_path

    print(local_path(a.base_model))
    return 0


def _reporting_errors(cmd):
    """A bad input (data, adapter, base model, value) ends the command with its message and exit status 2."""

    def run(a) -> int:
        from .adapter_io import AdapterError
        from .basemodel import BaseModelError
        from .data import DataError

        try:
            return cmd(a)
        except (DataError, AdapterError, BaseModelError, ValueError) as exc:
            print(f"dalorra {a.cmd}: error: {exc}", file=sys.stderr)
            return 2

    return run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="dalorra", description="DALorRA: train, evaluate and convert adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_train(sub)
    add_eval(sub)
    add_convert(sub)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
