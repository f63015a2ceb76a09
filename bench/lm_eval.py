"""lm-evaluation-harness itself, with its defaults, against a dalorra server on loopback (issue #27 item 1).

    python -m bench.lm_eval [--data arc_easy/validation] [--limit 200] [--adapter arc-easy-dalorra]
        [--samples 10] [--seed 0] [--gen-limit 10]

1. Starts `dalorra serve` on loopback (float32, the default adapter) and runs `lm-eval run --model
   local-completions` on a multiple-choice task written at run time into a temporary directory: the JSONL path is
   read at run time, no dataset text enters the repository. The prompt is the adapter's own cloze template and
   lm-eval's default " " target delimiter, so lm-eval asks the server exactly the continuations `dalorra eval`
   scores. Everything else is lm-eval's default: tokenizer_backend=auto (it finds the server's /tokenizer_info and
   /tokenize), token-ID prompts, echo with logprobs=1 and max_tokens=1, batch size 1. A few generate_until items
   run too (--gen-limit).
2. Runs `dalorra eval` on the same items (S mask draws of the adapter's fixed seed, the served decision rule).
3. Scores the same items in this process with the cloze scoring code on the mean-mask network (z = E[z]), the
   network whose log-probabilities /v1/completions echoes.

Writes bench/results/lm_eval.{json,md}: lm-eval's acc (summed log-likelihood) and acc_norm (per character), its
per-item log-likelihoods normalised per token as the adapter does, and how they compare with 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write
from bench.loopback import ServerProcess

REPO = Path(__file__).resolve().parents[1]


def _task_head(name: str, data: Path, template: str, output_type: str) -> list[str]:
    """The YAML lines both tasks share: a local JSONL ({question, choices, label}) and the adapter's template."""
    text = template.replace("{question}", "{{question}}").replace("{context}", "")
    return [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        f"output_type: {output_type}",
        f"doc_to_text: {json.dumps(text)}",
    ]


def task_yaml(name: str, data: Path, template: str) -> str:
    """A multiple-choice task on a local JSONL ({question, choices, label}); the adapter's cloze template."""
    return "\n".join(
        [
            *_task_head(name, data, template, "multiple_choice"),
            "doc_to_choice: choices",
            "doc_to_target: label",
            "metric_list:",
            "  - metric: acc",
            "  - metric: acc_norm",
            "",
        ]
    )


def gen_task_yaml(name: str, data: Path, template: str) -> str:
    """The same items as generate_until: greedy answers up to a newline, exact match with the gold choice."""
    return "\n".join(
        [
            *_task_head(name, data, template, "generate_until"),
            'doc_to_target: "{{choices[label]}}"',
            "target_delimiter: ' '",
            "generation_kwargs:",
            '  until: ["\\n"]',
            "  max_gen_toks: 16",
            "metric_list:",
            "  - metric: exact_match",
            "    ignore_case: true",
            "    ignore_punctuation: true",
            "",
        ]
    )


def run_lm_eval(url: str, adapter: str, tasks: list[str], include: Path, out: Path, limits: dict) -> list:
    """`lm-eval run` per task (its CLI, in a subprocess); returns the command lines."""
    cmds = []
    for task in tasks:
        cmd = [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "local-completions",
            "--model_args",
            f"model={adapter},base_url={url}/v1/completions",
            "--tasks",
            task,
            "--include_path",
            str(include),
            "--limit",
            str(limits[task]),
            "--output_path",
            str(out / task),
            "--log_samples",
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, cwd=tempfile.gettempdir())
        print(f"lm-eval {task}: {time.time() - t0:.0f} s", flush=True)
        cmds.append(
            " ".join(["lm-eval", *cmd[3:]]).replace(str(include), "<task dir>").replace(str(out), "<out>")
        )
    return cmds


def read_samples(out: Path, task: str) -> tuple[dict, list[dict]]:
    results = json.loads(next((out / task).rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in next((out / task).rglob(f"samples_{task}_*.jsonl")).open()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def mean_network_logits(adapter_dir: Path, items: list) -> tuple:
    """Per item, the cloze choice logits of the mean-mask network (the adapter's own scoring code and per-token
    normalisation), with the encoded items and the tokenizer."""
    import torch

    from adapters.adapter_io import load_adapter
    from adapters.basemodel import load_base
    from adapters.generate import mean_masks
    from adapters.scoring import choice_logits, encode

    base, tok = load_base(None, dtype="float32")
    model = load_adapter(adapter_dir, base, tok).eval()
    enc = encode(items, tok, model.fmt)
    mean = mean_masks(model)
    out = []  # per item, its K logits (a batch pads to its widest item)
    with torch.no_grad():
        for i in range(0, len(items), 8):
            rows = list(range(i, min(i + 8, len(items))))
            got = choice_logits(model, enc, rows, mean, torch.zeros(len(rows), dtype=torch.long)).numpy()
            out += [got[j, : enc[r].k] for j, r in enumerate(rows)]
    return out, enc, tok


def dalorra_eval(adapter_dir: Path, data: Path, limit: int, samples: int, seed: int, out: Path) -> tuple:
    cmd = [
        sys.executable,
        "-m",
        "dalorra",
        "eval",
        str(adapter_dir),
        "--data",
        str(data),
        "--limit",
        str(limit),
        "--samples",
        str(samples),
        "--seed",
        str(seed),
        "--out-dir",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=REPO)
    metrics = json.loads((out / "metrics.json").read_text())[0]
    preds = [json.loads(line) for line in next(out.glob("*.predictions.jsonl")).open()]
    shown = (
        f"dalorra eval adapters/default/{adapter_dir.name} --data <{data.parent.name}/{data.name}> "
        + " ".join(cmd[cmd.index("--limit") :]).replace(str(out), "<out>")
    )
    return metrics, preds, shown


def serve_and_run_lm_eval(a: argparse.Namespace, work: Path, data: Path, template: str) -> dict:
    """dalorra serve on loopback, lm-eval on both tasks; what ran is kept in work/run.json (for --reuse)."""
    (work / "tasks").mkdir()
    (work / "tasks" / "dalorra_mc.yaml").write_text(task_yaml("dalorra_mc", data, template))
    (work / "tasks" / "dalorra_gen.yaml").write_text(gen_task_yaml("dalorra_gen", data, template))
    tasks, limits = ["dalorra_mc"], {"dalorra_mc": a.limit, "dalorra_gen": a.gen_limit}
    if a.gen_limit:
        tasks.append("dalorra_gen")
    srv = ServerProcess(Path(a.adapters_dir), a.adapter, work / "server.log", DALORRA_DTYPE="float32")
    srv.wait_ready()
    try:
        t0 = time.time()
        cmds = run_lm_eval(srv.url, a.adapter, tasks, work / "tasks", work / "out", limits)
        ok = srv.metric("dalorra_generation_requests_total", {"outcome": "ok"})
        run = {
            "commands": cmds,
            "seconds": time.time() - t0,
            "served": {
                "echo_tokens": srv.metric("dalorra_prompt_logprob_tokens_total"),
                "generation_requests_ok": ok,
                "generation_requests_not_ok": srv.metric("dalorra_generation_requests_total") - ok,
            },
        }
    finally:
        srv.stop()
    (work / "run.json").write_text(json.dumps(run))
    return run


def main() -> None:
    from adapters.data import load_jsonl, resolve_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="arc_easy/validation", help="JSONL, or set/split in $DALORRA_DATA_DIR")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--gen-limit", type=int, default=10, help="generate_until items (0: skip)")
    ap.add_argument("--adapters-dir", default=str(REPO / "adapters" / "default"))
    ap.add_argument("--adapter", default="arc-easy-dalorra")
    ap.add_argument("--samples", type=int, default=10, help="dalorra eval's S")
    ap.add_argument("--seed", type=int, default=0, help="dalorra eval's mask seed")
    ap.add_argument(
        "--reuse", default=None, metavar="DIR", help="analyse an earlier run's work directory again"
    )
    a = ap.parse_args()
    data = resolve_path(a.data).resolve()
    adapter_dir = Path(a.adapters_dir) / a.adapter
    record = json.loads((adapter_dir / "dalorra.json").read_text())
    template = (record.get("prompt") or {}).get("template") or "Question: {question}\nAnswer:"
    items = load_jsonl(data, limit=a.limit)
    labels = np.array([it.label for it in items])

    if a.reuse:  # the analysis again on an earlier run's lm-eval output
        work = Path(a.reuse)
        run = json.loads((work / "run.json").read_text())
    else:
        work = Path(tempfile.mkdtemp(prefix="lm-eval-"))
        run = serve_and_run_lm_eval(a, work, data, template)
    cmds, lm_seconds, served = run["commands"], run["seconds"], run["served"]

    res, samples = read_samples(work / "out", "dalorra_mc")
    assert [s["doc"]["id"] for s in samples] == [it.id for it in items], "lm-eval read other items"
    # per choice: Σ log p(continuation) (lm-eval logs its responses and arguments as strings, by request)
    lls = [np.array([float(r[0][0]) for r in s["resps"]]) for s in samples]
    # 3. the same items in this process: the mean-mask network, the adapter's cloze scoring and normalisation
    mean_logits, enc, tok = mean_network_logits(adapter_dir, items)
    ntok = [np.array(e.norms) for e in enc]  # tokens per continuation (the adapter normalises per token)
    same_tokens = 0
    for s, e in zip(samples, enc, strict=True):  # lm-eval's _encode_pair: the whole's ids after the context's
        args = [(v["arg_0"], v["arg_1"]) for v in s["arguments"].values()]  # (context, continuation)
        ctx = tok(args[0][0], add_special_tokens=False).input_ids
        conts = [tok(c + x, add_special_tokens=False).input_ids[len(ctx) :] for c, x in args]
        same_tokens += conts == [list(c) for c in e.conts] and ctx == list(e.prompt)
    per_token = [ll / n for ll, n in zip(lls, ntok, strict=True)]
    diff = max(float(np.abs(p - m[: len(p)]).max()) for p, m in zip(per_token, mean_logits, strict=True))
    acc_lm_tokens = float(np.mean([int(np.argmax(p)) == y for p, y in zip(per_token, labels, strict=True)]))
    mean_pred = np.array([int(np.argmax(m[: len(p)])) for p, m in zip(per_token, mean_logits, strict=True)])
    lm_pred = np.array([int(np.argmax(p)) for p in per_token])
    acc_mean = float(np.mean(mean_pred == labels))
    # 2. dalorra eval: S hard mask draws of the adapter's fixed seed, averaged (BMA)
    ev, preds, ev_cmd = dalorra_eval(adapter_dir, data, a.limit, a.samples, a.seed, work / "eval")
    bma_pred = np.array([p["answer_index"] for p in preds])
    gen = read_samples(work / "out", "dalorra_gen")[0] if a.gen_limit else None

    out = {
        "data": f"{data.parent.name}/{data.name}",
        "items": len(items),
        "adapter": a.adapter,
        "lm_eval": {
            "version": _version("lm_eval"),
            "commands": cmds,
            "seconds": lm_seconds,
            "acc": res["acc,none"],
            "acc_norm": res["acc_norm,none"],
            "acc_per_token": acc_lm_tokens,
            "generate_until": None if gen is None else {"items": a.gen_limit, **gen},
        },
        "served": served,
        "mean_network_in_process": {
            "acc": acc_mean,
            "items_with_the_same_tokens": same_tokens,
            "max_abs_diff_per_token_loglik": diff,
            "items_with_another_answer_than_lm_eval": int((mean_pred != lm_pred).sum()),
        },
        "dalorra_eval": {
            "command": ev_cmd,
            "samples": a.samples,
            "seed": a.seed,
            "acc": ev["acc"],
            "ece": ev["ece"],
            "mean_epistemic": ev["mean_epistemic"],
            "items_with_another_answer_than_the_mean_network": int((bma_pred != mean_pred).sum()),
        },
    }
    print(json.dumps(out, indent=2, default=float))
    write("lm_eval", out, table(out))


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _agreement(ev: dict, mn: dict, n: int) -> str:
    k = ev["items_with_another_answer_than_the_mean_network"]
    mi = ev.get("mean_epistemic")
    spread = f" (mean MI {mi:.4f} nats: this adapter's masks barely disagree)" if mi is not None else ""
    if k == 0:
        return (
            f"Here the S-draw average and the mean network pick the same answer on all {n} items{spread}, so the "
            "accuracies are equal; an adapter whose masks disagree more can differ on the items near a tie."
        )
    return (
        f"The S-draw average and the mean network pick another answer on {k} of {n} items{spread}: that is the "
        f"whole accuracy difference ({mn['acc']:.3f} vs {ev['acc']:.3f})."
    )


def table(o: dict) -> str:
    lm, mn, ev = o["lm_eval"], o["mean_network_in_process"], o["dalorra_eval"]
    n = o["items"]
    rows = [
        f"{n} items of {o['data']}, adapter `{o['adapter']}` (cloze prompt, per-token normalisation), HF backend "
        "float32 on CPU, served by `dalorra serve` on loopback.",
        "",
        "| scorer | network | accuracy |",
        "|---|---|---|",
        f"| lm-eval `acc` (Σ log p of the choice) | mean-mask, via /v1/completions | {lm['acc']:.3f} |",
        f"| lm-eval `acc_norm` (per character) | mean-mask, via /v1/completions | {lm['acc_norm']:.3f} |",
        f"| lm-eval's log-likelihoods per token (the adapter's normalisation) | mean-mask, via /v1/completions "
        f"| {lm['acc_per_token']:.3f} |",
        f"| dalorra cloze scoring in-process | mean-mask (z = E[z]) | {mn['acc']:.3f} |",
        f"| `dalorra eval` (S = {ev['samples']}, seed {ev['seed']}) | average of {ev['samples']} hard mask draws "
        f"| {ev['acc']:.3f} |",
        "",
        "What matches, and why the rest differs:",
        "",
        f"- **Same items, same tokens.** lm-eval tokenized context and continuations through the server's "
        f"/tokenize; for {mn['items_with_the_same_tokens']} of {n} items the token ids equal the ones "
        '`dalorra eval` scores (same prompt template, " " + choice as the continuation).',
        f"- **Exact where the network is the same.** The echoed log-likelihoods divided by the continuation's "
        f"tokens equal the in-process cloze logits of the mean-mask network to {mn['max_abs_diff_per_token_loglik']:.1e}"
        f" (float32; one full forward on the server, a KV-cached prompt in the scoring code); they pick another "
        f"answer on {mn['items_with_another_answer_than_lm_eval']} of {n} items "
        f"(accuracy {lm['acc_per_token']:.3f} vs {mn['acc']:.3f}).",
        "- **lm-eval's own metrics normalise differently.** `acc` sums the log-probabilities (long choices lose), "
        "`acc_norm` divides by characters; the adapter divides by tokens. Same numbers underneath, other argmax.",
        f"- **`dalorra eval` averages {ev['samples']} hard mask draws; /v1/completions answers with one network, "
        f"z = E[z].** A log-likelihood request cannot ask for S samples (lm-eval sends a fixed body), so the "
        "server scores with the mean-mask network, the one that also decodes generated text (docs/api.md, "
        f'"lm-evaluation-harness"). {_agreement(ev, mn, n)} Calibration (`dalorra eval` ECE {ev["ece"]:.3f}) '
        "and epistemic uncertainty need the S draws: /predict, KServe, or `choices` on the OpenAI routes give them.",
        f"- lm-eval took {lm['seconds']:.0f} s for both tasks ({o['served']['generation_requests_ok']:.0f} requests "
        f"answered, {o['served']['generation_requests_not_ok']:.0f} refused or failed; "
        f"{o['served']['echo_tokens']:.0f} prompt tokens scored).",
    ]
    g = lm["generate_until"]
    if g:
        rows.append(
            f"- generate_until ({g['items']} items, greedy to a newline, token-ID prompts, `until` + EOS as stop "
            f"strings): exact_match {g.get('exact_match,none', float('nan')):.3f}. It shows the route works, not "
            "how good a 135M model is at writing ARC answers verbatim."
        )
    rows += [
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in lm["commands"]],
        f"    {o['dalorra_eval']['command']}",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
