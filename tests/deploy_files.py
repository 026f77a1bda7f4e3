"""deploy/'s Kubernetes files as the tests read them, and the API's schemas they are checked against.

The schemas come with kubernetes-validate (dev extra, from the lock): JSON schemas of every Kubernetes release it
knows, inside its wheel, so validating needs no cluster and no network. Strict: a field the API does not have fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
"""The oldest Kubernetes release the manifests promise, and the newest whose schemas kubernetes-validate has."""


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text())


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            if doc:
                yield name, doc


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} on Kubernetes {version}: {where}: {exc.message}")
    return errors
