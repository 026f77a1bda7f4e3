"""deploy/ as an operator uses it: the systemd units, the Kubernetes manifests, Prometheus and Grafana.

- systemd: ``systemd-analyze verify`` on the units (their ``/opt/cortex/venv/bin`` pointed at this venv, so the
  binaries they name must exist); then the units' command lines, expanded as systemd expands them
  (`tests.systemd_units`), start nats-server, a worker and a gateway that answer a chat completion and stop with
  status 0 on the units' KillSignal.
- Kubernetes: every manifest against the API's JSON schemas, strictly (`tests.deploy_files`); the names the pods
  use (volumes, ports, Secrets, the ConfigMap) against what the kustomization makes; ``kubectl kustomize`` renders
  the whole of it where kubectl is installed (it is on this kind of machine). The NATS chart's values:
  tests/test_nats_chart.py.
- Every ``--flag`` the units and the manifests pass is in the command's ``--help``.
- Grafana: every metric a panel queries is on the live session gateway's ``/metrics`` (a family with no sample
  yet, such as the per-key counters of a gateway without keys, is there by its ``# TYPE`` line); Prometheus scrapes
  the port and the annotations the gateways have.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cortex.broker import lockdown
from cortex.gateway.main import parse_args as gateway_args
from cortex.worker.catalogue import load_catalogue
from tests import systemd_units
from tests.conftest import TINY_MODEL, Gateway, child_env, free_port, ready_models, stop_process, wait_for
from tests.deploy_files import DEPLOY, KUBE, REPO, kustomization, manifests, schema_errors

UNITS = DEPLOY / "systemd"
VENV_BIN = Path(sys.executable).parent


def relocation(root: Path) -> systemd_units.Relocation:
    return systemd_units.Relocation({"/opt/cortex/venv/bin/": f"{VENV_BIN}/", "/etc/cortex/": f"{root}/etc/",
                                     "/var/lib/cortex/": f"{root}/var/"})  # fmt: skip


@cache
def help_text(command: str) -> str:
    out = subprocess.run([str(VENV_BIN / command), "--help"], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def unknown_flags(argv: list[str]) -> list[str]:
    """The options in `argv` its command's --help does not list (argv[0] names the command)."""
    text = help_text(Path(argv[0]).name)
    flags = {word.split("=", 1)[0] for word in argv[1:] if word.startswith("-")}
    return sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- systemd


def test_systemd_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    for unit in UNITS.glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/cortex/venv/bin/", f"{VENV_BIN}/"))
    names = ["cortex-gateway.service", "nats-server.service", "cortex-worker@0.service"]
    out = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in names)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)  # fmt: skip
    assert (out.returncode, out.stdout + out.stderr) == (0, ""), "systemd-analyze verify complained"


def test_every_flag_the_units_pass_exists(tmp_path: Path) -> None:
    for unit, instance in (("nats-server.service", ""), ("cortex-gateway.service", ""),
                           ("cortex-worker@.service", "0")):  # fmt: skip
        service = systemd_units.expand(UNITS / unit, relocation(tmp_path), instance)
        assert Path(service.argv[0]).parent == VENV_BIN
        assert unknown_flags(service.argv) == [], unit
        for args in systemd_units.example_args(UNITS / unit):
            assert unknown_flags([service.argv[0], *args]) == [], f"{unit}'s example {args}"


def test_the_units_start_the_stack_as_systemd_would(tmp_path: Path, tiny_model_dir: Path) -> None:
    """nats-server, cortex-worker@0 and cortex-gateway from their ExecStart lines; SIGTERM stops each with 0."""
    etc = tmp_path / "etc"
    (tmp_path / "var" / "nats").mkdir(parents=True)  # StateDirectory=cortex/nats
    etc.mkdir()
    nats_port, port, metrics_port = free_port(), free_port(), free_port()
    conf = (REPO / "nats.conf").read_text()
    assert "listen: 127.0.0.1:4222" in conf
    (etc / "nats.conf").write_text(conf.replace("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{nats_port}"))
    (etc / "models.toml").write_text(f'[[models]]\nid = "{TINY_MODEL}"\npath = "{tiny_model_dir}"\n')
    url = f"nats://127.0.0.1:{nats_port}"
    # What an operator writes in /etc/cortex (the units' comments), on a host of its own with ports of its own.
    (etc / "gateway.env").write_text(f"CORTEX_NATS_URL={url}\nGATEWAY_ARGS=--port {port} --metrics-port "
                                     f"{metrics_port}\n")  # fmt: skip
    (etc / "worker.env").write_text(f"CORTEX_NATS_URL={url}\n")
    (etc / "worker-0.env").write_text(f'WORKER_ARGS="--models /etc/cortex/models.toml --model {TINY_MODEL} '
                                      '--device cpu --slots 1"\n')  # fmt: skip
    started: list[tuple[str, subprocess.Popen[bytes], systemd_units.Service]] = []
    try:
        for unit, instance in (("nats-server.service", ""), ("cortex-worker@.service", "0"),
                               ("cortex-gateway.service", "")):  # fmt: skip
            service = systemd_units.expand(UNITS / unit, relocation(tmp_path), instance)
            with open(tmp_path / f"{unit}.log", "wb") as log:
                proc = subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT,
                                        env=child_env() | service.env)  # fmt: skip
            started.append((unit, proc, service))
            if unit == "nats-server.service":  # After=nats-server.service: the others start once it listens
                wait_for(lambda: listening(nats_port), timeout=30, what="nats-server listening", proc=proc)
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_for(lambda: TINY_MODEL in ready_models(base_url), timeout=120, what="the units' stack serving",
                 proc=started[1][1])  # fmt: skip
        body = {"model": TINY_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(f"{base_url}/chat/completions", json=body, timeout=60).status_code == 200
        assert "cortex_requests_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        for unit, proc, service in reversed(started):  # as systemd stops them: the gateway first
            assert service.settings["KillSignal"] == "SIGTERM"
            proc.send_signal(signal.SIGTERM)
            timeout = float(service.settings.get("TimeoutStopSec", "90"))  # systemd's DefaultTimeoutStopSec
            assert proc.wait(timeout=timeout) == 0, unit
    finally:
        for _, proc, _ in started:
            if proc.poll() is None:
                stop_process(proc)


# ---------------------------------------------------------------- Kubernetes


def test_the_manifests_match_the_kubernetes_schemas() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml", "nats-values.yaml"}
    assert listed == on_disk, "every manifest is in kustomization.yaml's resources"
    kinds = []
    for _name, doc in manifests():
        assert schema_errors(doc) == []
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["DaemonSet", "Deployment", "Namespace", "Service"]


def test_the_catalogues_are_ones_a_worker_reads() -> None:
    for catalogue in (DEPLOY / "models.toml", KUBE / "models.toml"):
        specs = load_catalogue(catalogue)
        assert [s.id for s in specs] == ["smollm2-135m-instruct"], catalogue


def test_the_pods_use_only_what_exists() -> None:
    """Volumes, ports, Secrets and the ConfigMap a pod names exist; the Service and the commands fit the pods."""
    k = kustomization()
    generated = {g["name"] for g in k["secretGenerator"] + k["configMapGenerator"]}
    for generator in k["secretGenerator"] + k["configMapGenerator"]:
        for entry in generator["files"]:
            source = entry.split("=", 1)[-1]
            assert source.startswith("secrets/") or (KUBE / source).is_file(), source
    images = {i["name"] for i in k["images"]}
    docs = {doc["kind"]: doc for _, doc in manifests()}
    for kind in ("Deployment", "DaemonSet"):
        spec = docs[kind]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["image"] in images
            assert unknown_flags(container["command"] + container["args"]) == [], kind
            assert {m["name"] for m in container["volumeMounts"]} <= volumes.keys()
            for probe in ("readinessProbe", "livenessProbe"):
                for check in ("httpGet", "tcpSocket"):
                    port = container.get(probe, {}).get(check, {}).get("port")
                    assert port is None or port in {p["name"] for p in container["ports"]}
            env = {e["name"]: e.get("value") for e in container["env"]}
            creds = Path(env["CORTEX_NATS_CREDS"])
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(creds.parent))
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert secret in generated
            assert any(f.split("=")[0] == creds.name for g in k["secretGenerator"] if g["name"] == secret
                       for f in g["files"]), f"{kind}'s Secret holds {creds.name}"  # fmt: skip
        for volume in volumes.values():
            for ref in (volume.get("configMap", {}).get("name"), volume.get("secret", {}).get("secretName")):
                assert ref is None or ref in generated
    service, gateway = docs["Service"], docs["Deployment"]
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    container_ports = {p["name"] for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_kustomize_renders_a_valid_cortex_namespace(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization is checked by the other tests only")
    work = tmp_path / "kubernetes"
    shutil.copytree(KUBE, work, ignore=shutil.ignore_patterns("secrets"))
    lockdown.write_credentials(work / "secrets")  # what `cortexctl credentials deploy/kubernetes/secrets` makes
    out = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        assert schema_errors(doc) == []
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "cortex"
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(secrets["cortex-nats-server"]["data"]) == {"cortex-users.conf", "nats-auth.conf"}
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            for volume in doc["spec"]["template"]["spec"]["volumes"]:
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in secrets  # the generated name, hash and all


# ---------------------------------------------------------------- Prometheus and Grafana


def test_prometheus_scrapes_the_gateways_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    default_port = gateway_args([]).metrics_port
    for target in jobs["cortex-gateway"]["static_configs"][0]["targets"]:
        assert target.endswith(f":{default_port}")
    # The Kubernetes job keeps the pods annotated so, on the port they name: the gateway's metrics port.
    gateway = next(doc for _, doc in manifests() if doc["kind"] == "Deployment")["spec"]["template"]
    annotations = gateway["metadata"]["annotations"]
    relabels = jobs["cortex-gateway-kubernetes"]["relabel_configs"]
    sources = {label for rule in relabels for label in rule["source_labels"]}
    for annotation in ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"):
        assert annotation in annotations
        assert "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation) in sources
    (container,) = gateway["spec"]["containers"]
    assert f"--metrics-port={annotations['prometheus.io/port']}" in container["args"]
    component = gateway["metadata"]["labels"]["app.kubernetes.io/component"]
    assert any(r.get("regex") == component for r in relabels if r["action"] == "keep")


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: its identifiers that are not functions, keywords, label names
    (in ``{...}`` and ``by (...)``), ranges or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges ($__rate_interval)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if match[0].lower() not in PROMQL_WORDS and not rest.startswith("("):
            names.add(match[0])
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page can hold: each family's samples, and its _total, _bucket, _sum, _count."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {s.name for s in family.samples}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "cortex-dashboard.json").read_text())


def test_the_dashboard_queries_only_metrics_the_gateway_exports(gateway: Gateway) -> None:
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    queried: dict[str, set[str]] = {}
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            queried[panel["title"]] = queried.get(panel["title"], set()) | metric_names(target["expr"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queried[f"${variable['name']}"] = set(re.findall(r"label_values\((\w+)", variable["query"]["query"]))
    assert all(queried.values()), "every panel queries a metric"
    # The session worker is advertised (the fixture waited for its model), so the fleet's metrics are there too.
    live = exported_names(httpx.get(gateway.metrics_url, timeout=10).text)
    missing = {title: sorted(names - live) for title, names in queried.items() if names - live}
    assert missing == {}
    everything = set().union(*queried.values())
    for wanted in ("cortex_requests_total", "cortex_completion_tokens_total", "cortex_model_queue_depth",
                   "cortex_time_to_first_token_seconds_bucket", "cortex_requests_in_flight", "cortex_failovers_total",
                   "cortex_worker_memory_bytes", "cortex_evictions_total", "cortex_cold_starts_total",
                   "cortex_key_requests_total", "cortex_key_tokens_total"):  # fmt: skip
        assert wanted in everything, f"the dashboard shows {wanted}"


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(cortex_x_bucket{model=~"$model", a="b c"}'
        "[$__rate_interval]))) / on (model) group_left max without (worker) (cortex_y) and cortex_z offset 5m"
    )
    assert metric_names(expr) == {"cortex_x_bucket", "cortex_y", "cortex_z"}
