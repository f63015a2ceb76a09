"""Report the shipped default adapter: training command, validation metrics, decisions, keep-probabilities.

    python bench/default_adapter.py [adapters/default/arc-easy-dalorra]
Reads the adapter's dalorra.json (written by `dalorra train`) and writes bench/results/default_adapter.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write  # noqa: E402

TRAIN_CMD = ("dalorra train --out adapters/default/arc-easy-dalorra --train arc_easy/train --validation "
             "arc_easy/validation --eval-limit 200 --eval-every 100 --steps 300 --batch-size 8 --lr 3e-4 "
             "--lr-mask 0.05 --mask-schedule constant --save-every 25 --seed 0")


def main() -> None:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "adapters" / "default"
             / "arc-easy-dalorra")
    rec = json.loads((d / "dalorra.json").read_text())
    if not rec.get("keep_histogram"):  # older records: compute it from the mask logits
        import numpy as np
        from safetensors.numpy import load_file

        kinds: dict[str, list] = {}
        for k, phi in load_file(str(d / "dalorra_masks.safetensors")).items():
            if k.endswith(".mask_logits"):
                kinds.setdefault(k[: -len(".mask_logits")].rsplit(".", 1)[-1], []).extend(1 / (1 + np.exp(-phi)))
        rec["keep_histogram"] = {k: np.histogram(v, bins=10, range=(0, 1))[0].tolist() for k, v in kinds.items()}
    v, c = rec["validation"], rec["calibration"]["metrics"]
    t = rec["training"]
    vals = [h for h in t["history"] if "val" in h]
    lines = [f"Trained with: `{TRAIN_CMD}`", "",
             f"Training: {t['steps']} steps × batch {t['config']['batch_size']} on {t['train_items']} ARC-Easy train "
             f"items (10% held out for calibration), {t['train_seconds']:.0f} s ({t['seconds_per_step']:.2f} s/step).",
             "", "| split | n | acc | ECE | NLL | Brier | AURC | mean MI | coverage | selective error | set size |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in (("ARC-Easy validation (first 200)", v), ("calibration split", c)):
        se = m.get("selective_error")
        lines.append(f"| {name} | {m['n']} | {m['acc']:.3f} | {m['ece']:.3f} | {m['nll']:.3f} | {m['brier']:.3f} | "
                     f"{m['aurc']:.3f} | {m['mean_epistemic']:.4f} | {m.get('coverage', 1):.3f} | "
                     f"{'-' if se is None else f'{se:.3f}'} | {m.get('mean_set_size', float('nan')):.2f} |")
    lines += ["", "Zero-shot on the same items (no adapter, cloze): see [core.md](core.md).", "",
              "Validation during training: " + ", ".join(
                  f"step {h['step']}: acc {h['val']['acc']:.3f} ECE {h['val']['ece']:.3f}" for h in vals), "",
              "## Decisions (fitted on the calibration split)", "", "```json",
              json.dumps(rec["decision"], indent=2), "```", "",
              "## Keep-probabilities σ(φ) per module kind", "",
              "Mean: " + ", ".join(f"{k} {x:.3f}" for k, x in rec["keep_probability"].items()), "",
              "Histogram over [0, 1] in 10 bins: " + json.dumps(rec.get("keep_histogram"))]
    write("default_adapter", {"adapter": str(d.name), "validation": v, "calibration": c,
                              "decision": rec["decision"], "keep_probability": rec["keep_probability"],
                              "keep_histogram": rec.get("keep_histogram"), "train_command": TRAIN_CMD},
          "\n".join(lines))


if __name__ == "__main__":
    main()
