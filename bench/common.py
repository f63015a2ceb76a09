"""Shared by the benchmark scripts: machine/version info and writing results (JSON + markdown), atomically."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def command() -> str:
    """The command line that ran this benchmark, as a reader would type it (`python -m bench.NAME ...`)."""
    argv0 = Path(sys.argv[0])
    if argv0.parent.name == "bench" and argv0.suffix == ".py":
        return shlex.join(["python", "-m", f"bench.{argv0.stem}", *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write(name: str, data: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine(), "command": command(), **data}
    out = RESULTS / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, out)
    m = data["machine"]
    md = (
        f"# {name}\n\nCommand: `{data['command']}`\n\nMachine: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, {m['date']}\n\n"
        + table
        + "\n"
    )
    tmp = RESULTS / f".{name}.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, RESULTS / f"{name}.md")
    return out


def mean_std(vals) -> str:
    """mean ± sample standard deviation over seeds"""
    vals = [v for v in vals if v is not None and not np.isnan(v)]
    if not vals:
        return "–"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"
