"""`dalorra <command>`: each command's module is imported only when that command runs, so `dalorra --help`
and `dalorra predict --help` start without torch, and a client-only install (`pip install 'dalorra[client]'`)
has a working `dalorra predict`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name: (module defining add_<name>(subparsers), one-line help, the extra that provides what it imports)
COMMANDS = {
    "serve": ("server.cli", "start the HTTP server (settings also from DALORRA_* env vars)", "server"),
    "predict": ("clients.cli", "ask a running server (one question, or a JSONL file)", "client"),
    "train": ("adapters.cli", "train a DALorRA (or baseline) adapter", "server"),
    "eval": (
        "adapters.cli",
        "evaluate adapters on a JSONL: ACC, ECE, NLL, Brier, AURC, decisions; fit "
        "the generation thresholds on a short-answer set",
        "server",
    ),
    "recalibrate": (
        "adapters.cli",
        "fit an adapter's temperature and abstention thresholds again on its calibration split",
        "server",
    ),
    "convert": ("adapters.cli", "convert the embedded GGUF model to the float cache now", "server"),
}


def _chosen(argv: list[str]) -> str | None:
    # The top-level parser has no options but -h, so the first word not starting with '-' is the command.
    return next((w for w in argv if not w.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(
        prog="dalorra", description="DALorRA: calibrated LoRA adapters and their server"
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    chosen = _chosen(argv)
    for name, (module, help_, extra) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_)  # listed by `dalorra --help`; its own options load when chosen
            continue
        try:
            getattr(importlib.import_module(module), f"add_{name}")(sub)
        except ModuleNotFoundError as exc:
            return _missing(name, extra, exc)
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except (
        ModuleNotFoundError
    ) as exc:  # e.g. `serve` in a client-only install: uvicorn is imported when it runs
        return _missing(a.cmd, extra=COMMANDS[a.cmd][2], exc=exc)


def _missing(name: str, extra: str, exc: ModuleNotFoundError) -> int:
    print(
        f"dalorra {name}: {exc}. This command needs the '{extra}' extra: pip install 'dalorra[{extra}]' "
        "(from a checkout: scripts/install.sh)",
        file=sys.stderr,
    )
    return 2
