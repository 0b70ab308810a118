"""The objects an LLMDeployment owns, built as plain dicts: the ConfigMap with the shared
configuration, and per role one Deployment and one Service. Owner references are added by
the caller (``kopf.adopt``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from cleave.operator.spec import MODELS_MOUNT, RoleSpec

CACHE_MOUNT = "/home/cleave/.cache"  # HOME of the image's user (infra/docker/Dockerfile)

MANAGED_BY = "cleave-operator"
ROLE_LABEL = "cleave.dev/role"
DEPLOYMENT_LABEL = "cleave.dev/llmdeployment"
CONFIG_HASH = "cleave.dev/config-hash"
TEMPLATE_HASH = "cleave.dev/template-hash"

# gRPC (or HTTP for the router) port, then the Prometheus port; the router serves
# /metrics on its HTTP port and gRPC Generate on 50051.
PORTS: dict[str, dict[str, int]] = {
    "router": {"http": 8000, "grpc": 50051},
    "prefill": {"grpc": 50070, "metrics": 9470},
    "decode": {"grpc": 50080, "metrics": 9480},
    "kvstore": {"grpc": 50060, "metrics": 9460},
    "expert": {"grpc": 50090, "metrics": 9490, "stream": 50091},  # stream: RunExperts without gRPC
}


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def config_map_name(owner: str) -> str:
    return f"{owner}-config"


def role_name(owner: str, role: str) -> str:
    return f"{owner}-{role}"


def labels(owner: str, role: str | None = None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "cleave",
        "app.kubernetes.io/instance": owner,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "cleave",
        DEPLOYMENT_LABEL: owner,
    }
    if role:
        result["app.kubernetes.io/component"] = role
        result[ROLE_LABEL] = role
    return result


def selector(owner: str, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": owner, ROLE_LABEL: role}


def config_map(owner: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(owner), "labels": labels(owner),
                     "annotations": {CONFIG_HASH: digest(dict(data))}},
        "data": dict(data),
    }


def deployment(owner: str, role: RoleSpec, replicas: int, *, image: str, pull_policy: str,
               model: Mapping[str, Any], config_hash: str) -> dict[str, Any]:
    """The role's Deployment; its pod template carries the config hash so that a change
    of the shared config rolls the pods, while a change of replicas only scales."""
    template = pod_template(owner, role, image=image, pull_policy=pull_policy, model=model,
                            config_hash=config_hash)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": role_name(owner, role.name), "labels": labels(owner, role.name),
                     "annotations": {TEMPLATE_HASH: digest(template)}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(owner, role.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": template,
        },
    }


def pod_template(owner: str, role: RoleSpec, *, image: str, pull_policy: str,
                 model: Mapping[str, Any], config_hash: str) -> dict[str, Any]:
    ports = PORTS[role.name]
    grpc_port = ports["grpc"]
    metrics_port = ports.get("metrics", ports.get("http"))
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "CLEAVE_HOST", "value": "0.0.0.0"},
        {"name": "CLEAVE_ADVERTISE_ADDRESS", "value": f"$(POD_IP):{grpc_port}"},
    ]
    if "stream" in ports:
        env.append({"name": "CLEAVE_STREAM_PORT", "value": str(ports["stream"])})
    container: dict[str, Any] = {
        "name": role.name,
        "image": image,
        "imagePullPolicy": pull_policy,
        "args": [role.name],
        "envFrom": [{"configMapRef": {"name": config_map_name(owner)}}],
        "env": env,
        "ports": [{"name": name, "containerPort": port} for name, port in ports.items()],
        "readinessProbe": {"grpc": {"port": grpc_port}, "periodSeconds": 5},
        "resources": dict(role.resources),
        "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # The root filesystem is read-only: scratch space and the image's CLEAVE_HOME
        # (under HOME) are emptyDirs, as in the chart's own pods.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_MOUNT}],
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    init_containers: list[dict[str, Any]] = []
    if model.get("image"):
        volumes.append({"name": "models", "emptyDir": {}})
        container["volumeMounts"].append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
        init_containers.append({
            "name": "model",
            "image": model["image"],
            "command": ["cp", "-r", "/model/.", f"{MODELS_MOUNT}/{model['name']}"],
            "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
        })
    elif model.get("persistentVolumeClaim"):
        volumes.append({"name": "models", "persistentVolumeClaim": {
            "claimName": model["persistentVolumeClaim"], "readOnly": True}})
        container["volumeMounts"].append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
        "nodeSelector": dict(role.node_selector),
        "tolerations": [dict(t) for t in role.tolerations],
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    return {
        "metadata": {
            "labels": labels(owner, role.name),
            "annotations": {
                CONFIG_HASH: config_hash,
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


def service(owner: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": role_name(owner, role), "labels": labels(owner, role)},
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner, role),
            "ports": [{"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                      for name, port in PORTS[role].items()],
        },
    }
