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


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]


def _exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]] + _dashboard_exprs()


# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARS = {"$__range": "1h", "$__interval": "1m", "$__rate_interval": "1m", "$adapter": ".*"}


def _as_sent(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert not re.search(r"\$\{?[A-Za-z_]", expr), expr  # a variable this list does not know
    return expr


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def test_dashboard_imports_into_any_grafana_and_provisions():
    """Importable: one datasource input, DS_PROMETHEUS, used by every panel, query and variable (no hard-coded
    uid). Provisioned as a file there is no import step: a datasource variable of the same name resolves
    `${DS_PROMETHEUS}` to the default Prometheus, which the provisioned datasource is."""
    text = DASHBOARD.read_text()
    dash = json.loads(text)
    assert [(i["name"], i["type"], i["pluginId"]) for i in dash["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    refs = [
        n["datasource"] for n in _walk(dash) if isinstance(n, dict) and isinstance(n.get("datasource"), dict)
    ]
    assert refs and all(r == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for r in refs), refs
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p["datasource"] and all(t["datasource"] for t in p["targets"]) for p in panels)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["DS_PROMETHEUS"]["type"] == "datasource"
        and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    )
    imported = json.loads(text.replace("${DS_PROMETHEUS}", "chosen-uid"))  # what Grafana's import does
    assert "DS_PROMETHEUS}" not in json.dumps(imported["panels"])
    required = {r["id"] for r in dash["__requires"] if r["type"] == "panel"}
    assert {p["type"] for p in panels} <= required

    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert [d["type"] for d in ds if d.get("isDefault")] == ["prometheus"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dalorra.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]["volumes"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose}
    assert (ROOT / mounted[provider["providers"][0]["options"]["path"]]).resolve() == DASHBOARD.parent


def test_dashboard_layout_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)), p["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for wanted in (
        "time to first token",
        "tokens per second",
        "generated answers: confidence",
        "epistemic",
        "version",
    ):
        assert wanted in titles, wanted


def test_dashboard_queries_parse(tmp_path):
    """Every panel query, with Grafana's variables filled in, is valid PromQL (promtool parses it as a rule)."""
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, expr in enumerate(_dashboard_exprs()):
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{i}", "expr": _as_sent(expr)})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run([_tool("promtool"), "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _reliability_exprs() -> dict[str, str]:
    panel = next(
        p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Reliability")
    )
    return {t["legendFormat"]: _as_sent(t["expr"]) for t in panel["targets"]}


def test_reliability_bins_sort_numerically_and_empty_bins_drop(tmp_path):
    """Bins are labels "0".."14": the diagram's queries pad them to two digits, so that the string order Grafana
    sorts by is the numeric order (not 0, 1, 10, ..., 14, 2, ...); a bin without predictions is left out."""
    series = []  # per minute: predictions, Σ confidence, Σ correct (binary-exact values: no roundoff)
    for b, n, conf, correct in (("2", 4, 1, 1), ("10", 8, 6, 6), ("0", 2, 0.125, 0), ("7", 0, 0, 0)):
        lab = f'adapter="a",bin="{b}"'
        series += [
            {"series": f"dalorra_calibration_predictions_total{{{lab}}}", "values": f"0+{n}x120"},
            {"series": f"dalorra_calibration_confidence_total{{{lab}}}", "values": f"0+{conf}x120"},
            {"series": f"dalorra_calibration_correct_total{{{lab}}}", "values": f"0+{correct}x120"},
        ]
    exprs = _reliability_exprs()

    def samples(values):
        return [{"labels": f'{{bin="{b}"}}', "value": v} for b, v in values.items()]

    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": exprs["accuracy"],
                        "eval_time": "120m",
                        "exp_samples": samples({"00": 0, "02": 0.25, "10": 0.75}),
                    },
                    {
                        "expr": exprs["mean confidence"],
                        "eval_time": "120m",
                        "exp_samples": samples({"00": 0.0625, "02": 0.25, "10": 0.75}),
                    },
                ],
            }
        ],
    }
    f = tmp_path / "bins_test.yml"
    f.write_text(yaml.safe_dump(test))
    r = subprocess.run([_tool("promtool"), "test", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    panel = next(
        p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Reliability")
    )
    sort = [t["options"]["sort"] for t in panel["transformations"] if t["id"] == "sortBy"]
    assert sort == [[{"field": "bin", "desc": False}]]  # Grafana orders the (now padded) bins as strings


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


KSERVE = ROOT / "deploy" / "k8s" / "kserve"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}
# KServe's ComponentExtensionSpec (pkg/apis/serving/v1beta1/component.go): the predictor's fields that are not
# PodSpec fields. Everything else in the predictor is a PodSpec, checked by kubernetes-validate as a Pod.
PREDICTOR_EXTENSION = {
    "minReplicas": _COUNT,
    "maxReplicas": _COUNT,
    "scaleTarget": _COUNT,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": _COUNT,
    "timeout": _COUNT,
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "logger": {"type": "object"},
    "batcher": {"type": "object"},
    "labels": _STRING_MAP,
    "annotations": _STRING_MAP,
    "deploymentStrategy": {"type": "object"},
}
INFERENCE_SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},  # KServe's name rule
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {"type": "object", "properties": PREDICTOR_EXTENSION},
                "transformer": {"type": "object"},
                "explainer": {"type": "object"},
            },
        },
    },
}


def _kserve_rendered() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(KSERVE)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _inference_service() -> dict:
    return next(d for d in _kserve_rendered() if d["kind"] == "InferenceService")


def test_kserve_inference_service_renders_and_validates(tmp_path):
    """deploy/k8s/kserve renders (kubectl kustomize); the InferenceService fits KServe's v1beta1 structure and its
    predictor's PodSpec fits Kubernetes' own schema (strict: no unknown field)."""
    import jsonschema

    docs = _kserve_rendered()
    assert sorted(d["kind"] for d in docs) == ["InferenceService", "PersistentVolumeClaim"]
    isvc = _inference_service()
    jsonschema.validate(isvc, INFERENCE_SERVICE_SCHEMA)
    pred = isvc["spec"]["predictor"]
    assert pred["minReplicas"] <= pred["maxReplicas"]
    pod_spec = {k: v for k, v in pred.items() if k not in PREDICTOR_EXTENSION}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    others = [d for d in docs if d["kind"] != "InferenceService"]
    f = tmp_path / "kserve.yaml"
    f.write_text(yaml.safe_dump_all([pod, *others]))
    r = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", str(f)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # The checks can fail: a misspelt extension field lands in the PodSpec, which strict validation refuses, and
    # a value KServe does not know fails the schema.
    f.write_text(yaml.safe_dump({**pod, "spec": {**pod_spec, "minReplica": 1}}))
    strict = [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", str(f)]
    assert subprocess.run(strict, capture_output=True).returncode != 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**isvc, "spec": {"predictor": {**pred, "scaleMetric": "gpu"}}}, INFERENCE_SERVICE_SCHEMA
        )


def test_kserve_predictor_is_this_server():
    """A custom predictor running this image: KServe's container name, the adapters from STORAGE_URI at
    /mnt/models, protocol v2, probes on the v2 health routes and Prometheus scraping, all on the served port."""
    isvc = _inference_service()
    pred = isvc["spec"]["predictor"]
    [c] = pred["containers"]
    assert c["name"] == "kserve-container" and c["image"] == "ghcr.io/example/dalorra:cpu"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert (
        env["STORAGE_URI"].startswith("pvc://dalorra-adapters")
        and env["DALORRA_ADAPTERS_DIR"] == "/mnt/models"
    )
    assert env["PROTOCOL"] == "v2" and env["DALORRA_HOST"] == "0.0.0.0"
    [port] = [p["containerPort"] for p in c["ports"]]
    assert int(env["DALORRA_PORT"]) == port
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert "startupProbe" not in c  # Knative (serverless mode) refuses it
    ann = pred["annotations"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert ann["prometheus.kserve.io/port"] == ann["prometheus.io/port"] == str(port)
    assert ann["prometheus.kserve.io/path"] == ann["prometheus.io/path"] == "/metrics"
    envs = {e["name"]: e for e in c["env"]}
    for key in ("DALORRA_FEEDBACK_KEY", "DALORRA_ADMIN_TOKEN"):
        assert "secretKeyRef" in envs[key]["valueFrom"] and "value" not in envs[key]


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

        # Every dashboard query, as Grafana sends it, runs on a real Prometheus scraping a real server.
        for expr in _dashboard_exprs():
            r = httpx.get(api, params={"query": _as_sent(expr)}, timeout=5).json()
            assert r["status"] == "success", (expr, r)

        # Every metric the rules and the dashboard name is one the server exports.
        exported = set(re.findall(r"^(dalorra_[a-z_]+)", httpx.get(srv.url + "/metrics").text, re.M))
        named = {m for e in _exprs() for m in re.findall(r"(?<![:\w])(dalorra_[a-z_]+)(?![:\w])", e)}
        assert named and named <= exported, sorted(named - exported)

        # The Deployment's and the InferenceService's probes and scrape path point at endpoints that exist.
        dep = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
        c = dep["spec"]["template"]["spec"]["containers"][0]
        isvc = _inference_service()["spec"]["predictor"]
        paths = [c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
        paths += [isvc["containers"][0][p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")]
        paths.append(isvc["annotations"]["prometheus.io/path"])
        for path in paths:
            assert httpx.get(srv.url + path).status_code == 200, path
    finally:
        prom.terminate()
        prom.wait(30)
        srv.stop()
