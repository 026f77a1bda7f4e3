"""The NATS Helm chart's values for Cortex (deploy/kubernetes/nats-values.yaml), and the broker they make.

No Helm here: every key the values set is checked against the chart's own values.yaml (nats-io/k8s,
helm/charts/nats, written against 2.14; `NATS_CHART_VALUES` lists its keys as deep as Cortex sets them), the
patches against the Kubernetes schemas, and the nats.conf the chart makes of them (its formatting rules, copied in
`chart_nats_conf`) runs three real nats-servers, locked down by the Secret's files, on which the admin provisions
every stream and bucket with three copies.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cortex.broker import lockdown
from cortex.broker.access import Access
from cortex.broker.bus import Bus
from cortex.broker.connection import connect
from cortex.broker.errors import BrokerUnavailable
from cortex.broker.server import EmbeddedNats
from tests.conftest import free_port, get_json, wait_for
from tests.deploy_files import DEPLOY, KUBE, kustomization, schema_errors

ANY = "any"
"""Free-form below: NATS configuration, Kubernetes objects or JSON patches (the chart's merge/patch)."""
_TLS = {"enabled": None, "secretName": None, "dir": None, "cert": None, "key": None, "merge": ANY, "patch": ANY}
_PVC = {"enabled": None, "size": None, "storageClassName": None, "merge": ANY, "patch": ANY, "name": None}
_IMAGE = {k: None for k in ("repository", "tag", "pullPolicy", "registry", "digest", "fullImageName")}
_RESOURCE = {"merge": ANY, "patch": ANY, "name": None}
NATS_CHART_VALUES: dict[str, Any] = {
    # The keys of the nats chart's values.yaml (nats-io/k8s, helm/charts/nats, 2.14), as deep as Cortex sets them.
    "global": ANY, "nameOverride": None, "fullnameOverride": None, "namespaceOverride": None, "tlsCA": ANY,
    "config": {
        "cluster": {"enabled": None, "port": None, "replicas": None, "noAdvertise": None, "routeURLs": ANY,
                    "tls": _TLS, "merge": ANY, "patch": ANY},
        "jetstream": {"enabled": None, "merge": ANY, "patch": ANY,
                      "fileStore": {"enabled": None, "dir": None, "pvc": _PVC, "maxSize": None},
                      "memoryStore": {"enabled": None, "maxSize": None}},
        "nats": {"port": None, "tls": _TLS}, "leafnodes": ANY, "websocket": ANY, "mqtt": ANY, "gateway": ANY,
        "monitor": {"enabled": None, "port": None, "tls": {"enabled": None}},
        "profiling": {"enabled": None, "port": None}, "resolver": ANY, "serverNamePrefix": None,
        "merge": ANY, "patch": ANY,
    },
    "container": {"image": _IMAGE, "ports": ANY, "env": ANY, "merge": ANY, "patch": ANY, "resources": ANY},
    "reloader": {"enabled": None, "image": _IMAGE, "env": ANY, "natsVolumeMountPrefixes": ANY, "merge": ANY,
                 "patch": ANY},
    "promExporter": ANY, "service": ANY, "statefulSet": _RESOURCE,
    "podTemplate": {"configChecksumAnnotation": None, "topologySpreadConstraints": ANY, "merge": ANY, "patch": ANY},
    "headlessService": _RESOURCE, "configMap": _RESOURCE, "podDisruptionBudget": ANY, "serviceAccount": ANY,
    "natsBox": ANY, "extraResources": ANY,
}  # fmt: skip


def keys_the_chart_lacks(values: dict[str, Any], chart: dict[str, Any], at: str = "") -> list[str]:
    missing = []
    for key, value in values.items():
        if key not in chart:
            missing.append(f"{at}{key}")
        elif isinstance(chart[key], dict):
            assert isinstance(value, dict), f"{at}{key} is a map in the chart"
            missing += keys_the_chart_lacks(value, chart[key], f"{at}{key}.")
    return missing


def nats_values() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "nats-values.yaml").read_text())


def chart_nats_conf(values: dict[str, Any], node: int, route_ports: list[int]) -> str:
    """The nats.conf the chart makes of `values` for pod `node`, its cluster's routes on 127.0.0.1 at `route_ports`;
    less the pod's pid file and monitor port, and the client address and store directory (given on the command
    line here).

    Its rules (files/config/config.yaml, cluster.yaml, jetstream.yaml; templates/_helpers.tpl, nats.formatConfig):
    the values become JSON with sorted keys, ``"<< x >>"`` loses its quotes, a ``...$include`` key becomes an include.
    """
    config = values["config"]
    js, cluster = config["jetstream"], config["cluster"]
    memory = f"<< {js['memoryStore']['maxSize']} >>" if js["memoryStore"]["enabled"] else 0
    conf: dict[str, Any] = {
        "server_name": f"nats-{node}", "lame_duck_grace_period": "10s", "lame_duck_duration": "30s",
        "jetstream": {"max_memory_store": memory, "max_file_store": f"<< {js['fileStore']['pvc']['size']} >>"},
        "cluster": {"name": "nats", "host": "127.0.0.1", "port": route_ports[node],
                    "no_advertise": cluster.get("noAdvertise", True),
                    "routes": [f"nats://127.0.0.1:{port}" for port in route_ports[: cluster["replicas"]]]},
    }  # fmt: skip
    conf |= config["merge"]
    text = json.dumps(conf, indent=2, sort_keys=True)
    text = re.sub(r'".*\$include": "(.*)",?', r"include \1;", text)
    return re.sub(r'"<<\s+(.*?)\s+>>"', r"\1", text)


def test_the_nats_values_are_the_charts_keys_with_jetstream_r3_on_files() -> None:
    values = nats_values()
    assert keys_the_chart_lacks(values, NATS_CHART_VALUES) == []
    config = values["config"]
    assert config["cluster"]["enabled"] and config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] and config["jetstream"]["fileStore"]["enabled"]
    # The patches are JSON patches adding a Secret volume and its mount: valid Kubernetes objects in a pod.
    (mount_op,) = values["container"]["patch"]
    (volume_op,) = values["podTemplate"]["patch"]
    assert (mount_op["op"], mount_op["path"], volume_op["op"], volume_op["path"]) == (
        "add", "/volumeMounts/-", "add", "/spec/volumes/-")  # fmt: skip
    mount, volume = mount_op["value"], volume_op["value"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "nats-0"},
        "spec": {"containers": [{"name": "nats", "image": "nats", "volumeMounts": [mount]}], "volumes": [volume]},
    }
    assert schema_errors(pod) == []
    assert mount["name"] == volume["name"]
    # ... the Secret the kustomization makes under that very name, holding the file the config includes.
    (generator,) = [g for g in kustomization()["secretGenerator"] if g["name"] == volume["secret"]["secretName"]]
    assert generator["options"]["disableNameSuffixHash"]
    include = posixpath.normpath(posixpath.join("/etc/nats-config", config["merge"]["$include"]))
    assert posixpath.dirname(include) == mount["mountPath"]
    assert posixpath.basename(include) in {f.split("=")[0] for f in generator["files"]}


def routes_up(node: EmbeddedNats, peers: int) -> bool:
    try:
        routez = get_json(f"http://127.0.0.1:{node.monitor_port}/routez")
    except OSError:
        return False
    return isinstance(routez, dict) and routez.get("num_routes", 0) >= peers


def test_the_charts_nats_conf_runs_a_locked_down_cluster_keeping_three_copies(tmp_path: Path) -> None:
    """Three servers on the chart's config with the Secret's files beside it: the admin provisions, every stream and
    bucket gets three copies, the gateway user joins, an anonymous client is refused."""
    values = nats_values()
    replicas = values["config"]["cluster"]["replicas"]
    secret = tmp_path / "etc" / "cortex-nats"
    creds = lockdown.write_credentials(secret)  # cortex-users.conf beside nats-auth.conf, as in the Secret
    shutil.copy(KUBE / "nats-auth.conf", secret / "nats-auth.conf")
    route_ports = [free_port() for _ in range(replicas)]
    nodes = []
    for i in range(replicas):
        config_dir = tmp_path / f"pod-{i}" / "etc" / "nats-config"  # the include climbs to ../cortex-nats
        config_dir.mkdir(parents=True)
        (config_dir / "nats.conf").write_text(chart_nats_conf(values, i, route_ports))
        shutil.copytree(secret, config_dir.parent / "cortex-nats")
        nodes.append(EmbeddedNats(store_dir=tmp_path / f"pod-{i}" / "data", port=0, config=config_dir / "nats.conf",
                                  log_file=tmp_path / f"nats-{i}.log", monitor_port=free_port()))  # fmt: skip
    try:
        for node in nodes:
            node.start()
        urls = ",".join(node.url for node in nodes)
        wait_for(lambda: all(routes_up(node, replicas - 1) for node in nodes), timeout=30, what="the routes")
        admin = Access.from_file(creds["admin"])

        async def copies() -> dict[str, int]:
            nc = await connect(urls, name="test-deploy", access=admin)
            try:
                return {i.config.name or "": i.config.num_replicas or 0 for i in await nc.jetstream().streams_info()}
            finally:
                await nc.close()

        async def members() -> int:
            nc = await connect(nodes[0].url, name="test-deploy", access=admin)
            await nc.close()
            return len(nc._server_info.get("connect_urls") or ())

        deadline = time.monotonic() + 10  # the members' addresses spread with the routes (unless not advertised)
        while asyncio.run(members()) < replicas and time.monotonic() < deadline:
            time.sleep(0.1)

        def provisioned() -> bool:
            try:
                asyncio.run(lockdown.provision_broker(urls, admin))
            except BrokerUnavailable:
                return False  # JetStream is still electing its leader
            return True

        wait_for(provisioned, timeout=30, what="the admin provisioning")
        counts = asyncio.run(copies())
        assert counts and counts == dict.fromkeys(counts, 3), counts

        async def join(access: Access) -> None:
            bus = await Bus.open(urls, name="test-deploy", access=access)
            await bus.close()

        asyncio.run(join(Access.from_file(creds["gateway"])))
        with pytest.raises(BrokerUnavailable, match="refused an anonymous connection"):
            asyncio.run(join(Access()))
    finally:
        for node in nodes:
            node.stop()


def test_the_kubernetes_permissions_are_nats_secure_confs() -> None:
    start = "# Each user's permissions:"
    secure = (DEPLOY / "nats-secure.conf").read_text()
    kube = (KUBE / "nats-auth.conf").read_text()
    assert start in secure and start in kube
    assert kube[kube.index(start) :] == secure[secure.index(start) :]
    assert 'include "cortex-users.conf"' in kube
