"""`dalorra train`, `dalorra eval`, `dalorra recalibrate` and `dalorra convert` (the `dalorra` entry point,
dalorra/cli.py, adds serve and predict). `python -m adapters.cli train ...` also works, for torchrun and
accelerate launch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from .model import DalorraModel


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_train(sub: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a DALorRA (or baseline) adapter",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in TrainConfig.options():  # one flag per field, its help written once on the field
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kind = {"int": int, "float": float, "bool": _bool}.get(
            str(f.type).split(" ")[0].replace("None", "").strip("| "), str
        )
        if f.name == "targets":
            p.add_argument(flag, default=",".join(default), help=f.metadata["help"])
        else:
            p.add_argument(
                flag, type=kind, default=default, required=f.default is MISSING, help=f.metadata["help"]
            )
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt/ exactly where it stopped")
    p.set_defaults(func=_reporting_errors(_cmd_train))


def _cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainConfig, run

    kw = {f.name: getattr(a, f.name) for f in TrainConfig.options()}
    kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
    rec = run(TrainConfig(**kw), resume=a.resume)
    if rec:
        v = rec.get("validation") or (rec.get("calibration") or {}).get("metrics") or {}
        out = {"adapter": a.out, **{k: v.get(k) for k in ("acc", "ece", "nll")}}
        if "generation_decision" in rec:
            out["generation_decision"] = rec["generation_decision"]
        print(json.dumps(out))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate adapters on a JSONL: ACC, ECE, NLL, Brier, AURC, decisions; fit "
        "the generation thresholds on a short-answer set",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("adapters", nargs="+", help="adapter directories ('none' = the base model zero-shot)")
    p.add_argument("--data", action="append", default=[], help="JSONL to evaluate on (repeatable)")
    p.add_argument("--base-model", default=None, help="base model (default: embedded SmolLM2)")
    p.add_argument("--samples", type=int, default=10, help="mask samples S")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward")
    p.add_argument(
        "--mode", choices=["letter", "cloze"], default=None, help="zero-shot scoring mode ('none')"
    )
    p.add_argument("--out-dir", default=None, help="write predictions JSONL, metrics JSON and PNG plots here")
    g = p.add_argument_group(
        "generation thresholds",
        "answer the short-answer questions of a multiple-choice set "
        "(gold choice of at most 3 words, question ending with '?') greedily, score each "
        "answer at S masks and fit the thresholds the server applies to generated answers",
    )
    g.add_argument(
        "--generation-set",
        default=None,
        metavar="DATASET_SPLIT_OR_JSONL",
        help="multiple-choice JSONL (path or name/split, e.g. arc_easy/validation) to fit them on",
    )
    g.add_argument("--generation-items", type=int, default=60, help="use at most N of its short-answer items")
    g.add_argument("--generation-max-tokens", type=int, default=16, help="longest generated answer")
    g.add_argument("--target-error", type=float, default=0.2, help="selective error target of the thresholds")
    g.add_argument(
        "--target-delta", type=float, default=0.1, help="the target holds with confidence 1 − delta"
    )
    g.add_argument(
        "--generation-out",
        default=None,
        metavar="PATH",
        help="write {adapter name: record} here (a DALORRA_GENERATION_DECISION file) instead of "
        "generation_decision.json in each adapter directory",
    )
    p.set_defaults(func=_reporting_errors(_cmd_eval))


def _cmd_eval(a: argparse.Namespace) -> int:
    from .adapter_io import load_adapter, write_json_atomic
    from .basemodel import load_base
    from .config import AdapterConfig, PromptFormat
    from .model import DalorraModel

    if not a.data and not a.generation_set:
        raise ValueError(
            "nothing to do: give --data (choice metrics) and/or --generation-set (generation thresholds)"
        )
    if a.generation_set and "none" in a.adapters:
        raise ValueError(
            "--generation-set fits thresholds for an adapter; 'none' (the base model) has no directory"
        )
    if a.generation_set and a.generation_items < 1:
        raise ValueError(f"--generation-items {a.generation_items}: must be >= 1")
    results, fitted = [], {}
    for ad in a.adapters:
        base, tok = load_base(a.base_model)
        if ad == "none":
            model = DalorraModel(base, tok, AdapterConfig(), PromptFormat(mode=a.mode or "cloze"))
            model.set_mask_mode("off")
        else:
            model = load_adapter(ad, base, tok, a.base_model or "")
        results += _eval_choices(a, ad, model)
        if a.generation_set:
            fitted[ad] = _fit_generation(a, ad, model)
    if a.out_dir:
        write_json_atomic(Path(a.out_dir) / "metrics.json", results)
    if a.generation_out:
        write_json_atomic(Path(a.generation_out), {Path(ad).name: rec for ad, rec in fitted.items()})
    return 0


def _eval_choices(a: argparse.Namespace, ad: str, model: DalorraModel) -> list[dict]:
    """Choice metrics of one adapter on every --data set (predictions and plots with --out-dir)."""
    import numpy as np

    from .data import load_jsonl
    from .evaluate import evaluate_logits, plot_reliability, predict_logits, write_predictions
    from .uncertainty import summarize

    record = getattr(model, "record", None) or {}  # 'none': no record, no decision, T = 1
    decision = record.get("decision")
    T = float(record.get("temperature", 1.0))  # the fitted temperature, as the server applies it
    results = []
    for data in a.data:
        items = load_jsonl(data, limit=a.limit)
        logits = predict_logits(model, items, a.samples, a.seed, a.batch_size, desc=Path(data).stem) / T
        labels = np.array([it.label for it in items])
        m = {
            "adapter": ad,
            "data": data,
            "samples": a.samples,
            "temperature": T,
            **evaluate_logits(logits, labels, decision),
        }
        results.append(m)
        print(json.dumps(m))
        if a.out_dir:
            od = Path(a.out_dir)
            od.mkdir(parents=True, exist_ok=True)
            stem = f"{Path(ad).name}__{Path(data).parent.name}_{Path(data).stem}"
            write_predictions(od / f"{stem}.predictions.jsonl", items, logits)
            _plot_or_warn(
                plot_reliability, od / f"{stem}.png", summarize(logits)["probabilities"], labels, stem
            )
    return results


def _fit_generation(a: argparse.Namespace, ad: str, model: DalorraModel) -> dict:
    """Fit one adapter's generation thresholds on --generation-set; write them unless --generation-out collects."""
    from .adapter_io import write_json_atomic
    from .data import load_jsonl
    from .short_answers import DECISION_FILE, decision_summary, fit_generation_thresholds

    rec = fit_generation_thresholds(
        model,
        load_jsonl(a.generation_set),
        adapter=Path(ad).name,
        source=a.generation_set,
        limit=a.generation_items,
        samples=a.samples,
        target_error=a.target_error,
        delta=a.target_delta,
        max_tokens=a.generation_max_tokens,
        mask_seed=a.seed,
    )
    where = a.generation_out or str(Path(ad) / DECISION_FILE)
    if not a.generation_out:
        write_json_atomic(Path(where), rec)
    print(json.dumps({"adapter": ad, "generation_decision": decision_summary(rec), "written_to": where}))
    return rec


def _plot_or_warn(
    plot: Callable[[Path, np.ndarray, np.ndarray, str], None],
    path: Path,
    probs: np.ndarray,
    labels: np.ndarray,
    title: str,
) -> bool:
    """The reliability plot needs matplotlib (an optional extra); without it the metrics are still written."""
    try:
        plot(path, probs, labels, title)
    except ImportError as exc:
        print(
            f"dalorra eval: {exc.name or 'matplotlib'} is not installed, so {path.name} was skipped; the metrics "
            "and predictions are written (pip install matplotlib for the plots)",
            file=sys.stderr,
        )
        return False
    return True


def add_recalibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recalibrate",
        help="fit an adapter's temperature and abstention thresholds again on its calibration split",
        description="Score the adapter's calibration split (rebuilt from the training config in its dalorra.json, "
        "or --calibration), fit one temperature by NLL, then the abstention thresholds and conformal quantile "
        "after it, and rewrite dalorra.json atomically (weights untouched). For adapters trained before "
        "temperature scaling, or to refit on new calibration data. A running server serves it after "
        "POST /v1/adapters/NAME/load (an admin action).",
    )
    p.add_argument("adapter", help="adapter directory")
    p.add_argument(
        "--calibration", default=None, help="calibration JSONL (default: the split it was trained with)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="mask samples S to fit at; also written as the adapter's default_samples, so the server serves the "
        "S the thresholds hold at (default: the adapter's training S)",
    )
    p.add_argument("--base-model", default=None, help="base model (default: the one it was trained on)")
    p.add_argument(
        "--validation",
        default=None,
        help="validation JSONL (path or name/split) whose metrics are re-scored at the new temperature and "
        "stored as the record's `validation` (default: the split it was trained with, if any)",
    )
    p.add_argument(
        "--eval-limit", type=int, default=None, help="first N validation items (default: as trained, 200)"
    )
    p.add_argument(
        "--target-error", type=float, default=None, help="selective error target (default: as trained)"
    )
    p.add_argument(
        "--target-delta", type=float, default=None, help="confidence 1 − delta (default: as trained)"
    )
    p.add_argument(
        "--conformal-alpha", type=float, default=None, help="set coverage 1 − alpha (default: as trained)"
    )
    p.add_argument(
        "--unfamiliar-alpha",
        type=float,
        default=None,
        help="level of the unfamiliarity rule: inputs with a p-value below it need the stricter thresholds "
        "(default: as trained, 0.05)",
    )
    p.add_argument(
        "--temperature-scaling",
        type=_bool,
        default=True,
        help="fit a temperature on a third of the split (false: remove it, T = 1; default: true)",
    )
    p.add_argument("--progress", type=_bool, default=True, help="show progress bars (default: true)")
    p.set_defaults(func=_reporting_errors(_cmd_recalibrate))


def _cmd_recalibrate(a: argparse.Namespace) -> int:
    from .train import recalibrate

    if a.samples is not None and a.samples < 1:
        raise ValueError(f"--samples {a.samples}: must be >= 1")
    if a.eval_limit is not None and a.eval_limit < 1:
        raise ValueError(f"--eval-limit {a.eval_limit}: must be >= 1")
    rec = recalibrate(
        a.adapter,
        base_model=a.base_model,
        calibration=a.calibration,
        validation=a.validation,
        eval_limit=a.eval_limit,
        eval_samples=a.samples,
        target_error=a.target_error,
        target_delta=a.target_delta,
        conformal_alpha=a.conformal_alpha,
        unfamiliar_alpha=a.unfamiliar_alpha,
        temperature_scaling=a.temperature_scaling,
        progress=a.progress,
    )
    dec = rec.get("decision") or {}
    pol = dec.get("policy") or {}
    print(
        json.dumps(
            {
                "adapter": a.adapter,
                **rec["recalibrated"],
                "calibration": (rec.get("calibration") or {}).get("metrics"),
                "validation": rec.get("validation"),
                "default_samples": rec.get("default_samples"),
                "policy": {
                    k: pol.get(k)
                    for k in ("valid", "reason", "min_confidence", "max_epistemic", "unfamiliar")
                },
                "conformal_qhat": (dec.get("conformal") or {}).get("qhat"),
            }
        )
    )
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert the embedded GGUF model to the float cache now")
    p.add_argument("--base-model", default=None)
    p.set_defaults(func=_reporting_errors(_cmd_convert))


def _cmd_convert(a: argparse.Namespace) -> int:
    from .basemodel import local_path

    print(local_path(a.base_model))
    return 0


def _reporting_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bad input (data, adapter, base model, value) ends the command with its message and exit status 2."""

    def run(a: argparse.Namespace) -> int:
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
    ap = argparse.ArgumentParser(
        prog="dalorra", description="DALorRA: train, evaluate, recalibrate and convert adapters"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_train(sub)
    add_eval(sub)
    add_recalibrate(sub)
    add_convert(sub)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
