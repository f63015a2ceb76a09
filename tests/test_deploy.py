"""Deploy artefacts: rules, dashboard, manifests and compose file, checked with the real tools.

A real Prometheus (Debian package) scrapes a real server; its ECE recording rule must equal the offline ECE.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from adapters.calibration import metrics as offline_metrics
from adapters.data import load_jsonl
from tests.server_utils import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dalorra.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (scripts/test.sh installs Debian's prometheus package)"
    return path


def _exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    out = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    out += [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return out


def test_promtool_checks_rules():
    r = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ece_rule_pools_replicas_before_abs(tmp_path):
    """Two replicas whose per-bin gaps cancel (one under-, one over-confident by 0.25 in the same bin): the pooled
    ECE is 0. Taking abs() per replica before summing would report 0.25 (binary-exact values: no roundoff)."""
    series = []
    for inst, correct in (("r1", "0.75"), ("r2", "0.25")):
        lab = f'adapter="a",bin="12",instance="{inst}"'
        series += [
            {"series": f"dalorra_calibration_confidence_total{{{lab}}}", "values": "0+0.5x120"},
            {"series": f"dalorra_calibration_correct_total{{{lab}}}", "values": f"0+{correct}x120"},
            {"series": f"dalorra_calibration_predictions_total{{{lab}}}", "values": "0+1x120"},
        ]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": "adapter:dalorra_ece:1h",
                        "eval_time": "90m",
                        "exp_samples": [{"labels": 'adapter:dalorra_ece:1h{adapter="a"}', "value": 0}],
                    }
                ],
            }
        ],
    }
    f = tmp_path / "ece_test.yml"
    f.write_text(yaml.safe_dump(test))
    r = subprocess.run([_tool("promtool"), "test", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheusrule_manifest_matches_rules_file():
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml").read_text())
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_manifests_render_and_validate(overlay, tmp_path):
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    f = tmp_path / "all.yaml"
    f.write_text(rendered)
    r = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--quiet", str(f)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds


def test_secrets_come_from_the_environment_with_no_published_default():
    """No secret value is written in the compose file or the manifests: compose passes the environment through
    (empty when unset: the server then uses a random feedback key), k8s reads a Secret."""
    env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dalorra"]["environment"]
    for key in ("DALORRA_FEEDBACK_KEY", "DALORRA_ADMIN_TOKEN"):
        assert re.fullmatch(r"\$\{" + key + r"(:-)?\}", env[key]), (key, env[key])
    dep = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    containers = dep["spec"]["template"]["spec"]["containers"]
    envs = {e["name"]: e for c in containers for e in c.get("env", [])}
    for key in ("DALORRA_FEEDBACK_KEY", "DALORRA_ADMIN_TOKEN"):
        assert "secretKeyRef" in envs[key]["valueFrom"] and "value" not in envs[key]


def test_compose_file_is_valid():
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    ok = subprocess.run(
        [str(binary), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True
    )
    assert ok.returncode == 0, ok.stderr
    bad = ROOT / "tests" / ".bad-compose.yml"
    bad.write_text("services:\n  x:\n    image: 5\n    ports: {oops: 1}\n")
    try:
        assert (
            subprocess.run([str(binary), "-f", str(bad), "config", "-q"], capture_output=True).returncode != 0
        )
    finally:
        bad.unlink()


@pytest.mark.smollm
def test_real_prometheus_ece_equals_offline(adapters_dir, data_dir, tmp_path):
    srv = ServerProcess(adapters_dir, "test-ad", tmp_path / "server.log").wait_ready()
    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "dalorra", "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}]}
                ],
            }
        )
    )
    prom = subprocess.Popen(
        [
            _tool("prometheus"),
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=open(tmp_path / "prom.log", "w"),
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1/query"

    def query(q):
        # Until its TSDB is open Prometheus answers 503 "Service Unavailable" in plain text, not JSON.
        try:
            r = httpx.get(api, params={"query": q}, timeout=5)
        except httpx.HTTPError:
            return []
        if r.status_code != 200:
            return []
        return r.json().get("data", {}).get("result", [])

    try:
        end = time.time() + 90
        while time.time() < end and not query('dalorra_calibration_predictions_total{adapter="test-ad"}'):
            time.sleep(0.5)  # the zero-initialised counters have been scraped at least once
        items = load_jsonl(data_dir / "arc_easy" / "validation.jsonl", limit=12)
        preds = httpx.post(
            srv.url + "/predict",
            json=[{"question": it.question, "choices": list(it.choices)} for it in items],
            timeout=300,
        ).json()
        for p, it in zip(preds, items, strict=True):
            assert (
                httpx.post(
                    srv.url + "/feedback", json={"receipt": p["receipt"], "label": it.label}
                ).status_code
                == 200
            )
        probs = np.zeros((len(items), 5))
        for i, p in enumerate(preds):
            probs[i, : len(p["probabilities"])] = p["probabilities"]
        offline = offline_metrics(probs, np.array([it.label for it in items]))["ece"]
        # Wait until Prometheus has scraped every labelled prediction and evaluated the rule after that.
        end = time.time() + 60
        value = None
        while time.time() < end:
            n = query('sum(dalorra_calibration_predictions_total{adapter="test-ad"})')
            if n and float(n[0]["value"][1]) == len(items):
                time.sleep(2.5)
                res = query('adapter:dalorra_ece:1h{adapter="test-ad"}')
                if res:
                    value = float(res[0]["value"][1])
                    break
            time.sleep(0.5)
        assert value is not None, (tmp_path / "prom.log").read_text()[-2000:]
        assert value == pytest.approx(offline, abs=1e-6)

        # Every metric the rules and the dashboard name is one the server exports.
        exported = set(re.findall(r"^(dalorra_[a-z_]+)", httpx.get(srv.url + "/metrics").text, re.M))
        named = {m for e in _exprs() for m in re.findall(r"(?<![:\w])(dalorra_[a-z_]+)(?![:\w])", e)}
        assert named and named <= exported, sorted(named - exported)

        # The Deployment's probes point at endpoints that exist.
        dep = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
        c = dep["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert httpx.get(srv.url + c[probe]["httpGet"]["path"]).status_code == 200
    finally:
        prom.terminate()
        prom.wait(30)
        srv.stop()
