"""kopf handlers for LLMDeployment (cleave.dev/v1alpha1): create, update and resume
reconcile the owned ConfigMap, Deployments and Services (create-or-patch, never a
duplicate); a timer reads the Deployments back into ``status``. State lives in the
resource's status and annotations, never in memory, so a restarted operator resumes."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import kopf
import kubernetes

from cleave.operator import children, scaling
from cleave.operator.spec import ROLES, ReplicaPlan, RoleSpec, SpecError, plan_replicas, read_roles, shared_config

GROUP, VERSION, PLURAL = "cleave.dev", "v1alpha1", "llmdeployments"
MERGE_PATCH = "application/merge-patch+json"
STATUS_INTERVAL = float(os.environ.get("CLEAVE_OPERATOR_STATUS_INTERVAL", "15"))
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ScalingLimited")


def operator_defaults() -> dict[str, str]:
    """What a resource may leave out, from the operator's environment (set by the chart)."""
    return {
        "image": os.environ.get("CLEAVE_IMAGE", "cleave:0.1.0"),
        "pull_policy": os.environ.get("CLEAVE_IMAGE_PULL_POLICY", "IfNotPresent"),
        "redis_url": os.environ.get("CLEAVE_REDIS_URL", ""),
        "events_bootstrap": os.environ.get("CLEAVE_EVENTS_BOOTSTRAP", ""),
        "prometheus_url": os.environ.get("CLEAVE_PROMETHEUS_URL", ""),
    }


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    # No cluster-wide watching of namespaces and CRDs: the RBAC stays within the
    # resources it reconciles (docs/operator.md).
    settings.scanning.disabled = True


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status,
              name: str, namespace: str, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    conditions = Conditions(status.get("conditions"), meta.get("generation"))
    if spec.get("paused"):
        conditions.set("Progressing", "False", "Paused", "spec.paused is true: nothing is changed")
        patch.status["conditions"] = conditions.items
        kopf.info(body, reason="Paused", message="spec.paused is true: no objects were changed")
        return
    try:
        roles = autoscaled_roles(read_roles(spec), spec, status)
        config = shared_config(spec, operator_defaults())
    except SpecError as error:
        conditions.set("Degraded", "True", "InvalidSpec", str(error))
        patch.status["conditions"] = conditions.items
        kopf.warn(body, reason="InvalidSpec", message=str(error))
        raise kopf.PermanentError(str(error)) from error

    plan = plan_replicas(roles, (spec.get("autoscaling") or {}).get("budget"))
    defaults = operator_defaults()
    config_map = children.config_map(name, config)
    config_hash = config_map["metadata"]["annotations"][children.CONFIG_HASH]
    decisions: list[dict[str, Any]] = []
    with kubernetes.client.ApiClient() as api:
        core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
        kopf.adopt(config_map, owner=body)
        if apply_config_map(core, namespace, config_map):
            kopf.info(body, reason="ConfigChanged",
                      message=f"ConfigMap {config_map['metadata']['name']} written (config {config_hash})")
        for role in roles.values():
            deployment = children.deployment(
                name, role, plan.replicas[role.name], image=spec.get("image") or defaults["image"],
                pull_policy=spec.get("imagePullPolicy") or defaults["pull_policy"],
                model=spec["model"], config_hash=config_hash)
            service = children.service(name, role.name)
            kopf.adopt([deployment, service], owner=body)
            decisions += apply_deployment(apps, namespace, deployment, role, plan, body)
            action = apply_service(core, namespace, service)
            if action:
                kopf.info(body, reason=action, message=f"Service {service['metadata']['name']} {action.lower()}")
        for role_name in ROLES:
            if role_name not in roles and remove_role(apps, core, namespace, name, role_name):
                kopf.info(body, reason="Removed",
                          message=f"role {role_name} is no longer in spec.roles: its Deployment and Service were deleted")
        write_status(patch, conditions, plan, observe(apps, namespace, name, plan), meta)
    if plan.limited:
        kopf.warn(body, reason="ScalingLimited", message="; ".join(plan.limited))
    if decisions:
        patch.status["lastScalingDecision"] = decisions[-1]
    logger.info("reconciled %s: replicas %s, config %s", name, plan.replicas, config_hash)


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_INTERVAL, initial_delay=STATUS_INTERVAL)
def refresh_status(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, name: str,
                   namespace: str, patch: kopf.Patch, **_: Any) -> None:
    """Read the Deployments back into status (ready replicas, Ready/Progressing/Degraded)
    and re-check the budget; with ``autoscaling.policy.enabled``, step prefill or decode
    against the latency targets (``autoscale``, docs/operator.md "Scaling")."""
    try:
        roles = autoscaled_roles(read_roles(spec), spec, status)
    except SpecError:
        return
    plan = plan_replicas(roles, (spec.get("autoscaling") or {}).get("budget"))
    conditions = Conditions(status.get("conditions"), meta.get("generation"))
    if spec.get("paused"):
        conditions.set("Progressing", "False", "Paused", "spec.paused is true: nothing is changed")
    with kubernetes.client.ApiClient() as api:
        apps = kubernetes.client.AppsV1Api(api)
        limited = None
        if scaling.Policy.from_spec(spec.get("autoscaling")).enabled and not spec.get("paused") \
                and handled_spec(meta) == dict(spec):  # never while reconcile has a change to apply
            limited = autoscale(apps, body, spec, status, name, namespace, roles, plan, patch)
        observed = observe(apps, namespace, name, plan)
    write_status(patch, conditions, plan, observed, meta, paused=bool(spec.get("paused")))
    if limited:  # after write_status, which sets ScalingLimited from the budget alone
        reason, message = limited
        before = Conditions(status.get("conditions"), None).by_type.get("ScalingLimited") or {}
        if (before.get("reason"), before.get("message")) != (reason, message):  # an Event per change, not per tick
            kopf.warn(body, reason=reason, message=message)
        conditions.set("ScalingLimited", "True", reason, message)
        patch.status["conditions"] = conditions.items


def autoscaled_roles(roles: dict[str, RoleSpec], spec: Mapping[str, Any],
                     status: Mapping[str, Any]) -> dict[str, RoleSpec]:
    """With autoscaling on, the scaled pools keep the replicas last applied
    (``status.desiredReplicas``, within min/max): spec replicas are the starting point."""
    if not scaling.Policy.from_spec(spec.get("autoscaling")).enabled:
        return roles
    applied = status.get("desiredReplicas") or {}
    return {name: dataclasses.replace(role, replicas=min(max(int(applied[name]), role.min_replicas), role.max_replicas))
            if name in scaling.SCALED_ROLES and name in applied else role for name, role in roles.items()}


def autoscale(apps: Any, body: kopf.Body, spec: Mapping[str, Any], status: Mapping[str, Any], name: str,
              namespace: str, roles: Mapping[str, RoleSpec], plan: ReplicaPlan,
              patch: kopf.Patch) -> tuple[str, str] | None:
    """Read the metrics, ``scaling.decide`` one step, apply it to the role's Deployment and
    record it (status, Event, Redis). Answers (reason, message) for the ScalingLimited
    condition when metrics are missing or a wanted step is refused, else None."""
    defaults = operator_defaults()
    targets = scaling.targets_from_spec(spec)
    if not defaults["prometheus_url"]:
        return "MetricsUnavailable", "autoscaling is enabled but no Prometheus URL is configured (CLEAVE_PROMETHEUS_URL)"
    client = scaling.PrometheusClient(defaults["prometheus_url"])
    metrics = client.metrics(targets)
    if metrics is None:
        return "MetricsUnavailable", f"{client.error}; no scaling decision"
    last = (status.get("lastScalingDecision") or {}).get("time")
    decision = scaling.decide(
        targets=targets, policy=scaling.Policy.from_spec(spec.get("autoscaling")),
        replicas={role: plan.replicas[role] for role in scaling.SCALED_ROLES},
        bounds={role: (roles[role].min_replicas, roles[role].max_replicas) for role in scaling.SCALED_ROLES},
        metrics=metrics, now=time.time(), paused=bool(spec.get("paused")),
        last_decision=_parse_time(last) if last else None,
        max_total=((spec.get("autoscaling") or {}).get("budget") or {}).get("maxTotalReplicas"))
    if decision is None:
        return None
    if decision.limited:
        return "AutoscalingLimited", decision.reason
    plan.replicas[decision.role] = decision.after
    config_map = children.config_map(name, shared_config(spec, defaults))
    deployment = children.deployment(
        name, roles[decision.role], decision.after, image=spec.get("image") or defaults["image"],
        pull_policy=spec.get("imagePullPolicy") or defaults["pull_policy"], model=spec["model"],
        config_hash=config_map["metadata"]["annotations"][children.CONFIG_HASH])
    kopf.adopt(deployment, owner=body)
    for record in apply_deployment(apps, namespace, deployment, roles[decision.role], plan, body,
                                   reason=decision.reason):
        patch.status["lastScalingDecision"] = record
        redis_url = (spec.get("connections") or {}).get("redisUrl") or defaults["redis_url"]
        scaling.push_decision(redis_url, {"ts": time.time(), "deployment": name, **{
            key: record[key] for key in ("role", "from", "to", "reason")}})
    return None


def handled_spec(meta: Mapping[str, Any]) -> Any:
    """The spec kopf last handled successfully (its diff base annotation), or None."""
    stored = (meta.get("annotations") or {}).get(f"{GROUP}/last-handled-configuration")
    try:
        return json.loads(stored).get("spec") if stored else None
    except ValueError:
        return None


def _parse_time(value: str) -> float:
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


# --- applying: create when missing, patch only what differs ---------------------------

def _read(call: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
    try:
        return json.loads(call(*args, _preload_content=False).data)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise


def apply_config_map(core: Any, namespace: str, desired: dict[str, Any]) -> bool:
    name = desired["metadata"]["name"]
    current = _read(core.read_namespaced_config_map, name, namespace)
    if current is None:
        core.create_namespaced_config_map(namespace, desired, _preload_content=False)
        return True
    if current.get("data") == desired["data"] and _owned(current, desired):
        return False
    core.patch_namespaced_config_map(name, namespace, {"metadata": desired["metadata"], "data": desired["data"]},
                                     _content_type=MERGE_PATCH, _preload_content=False)
    return True


def apply_deployment(apps: Any, namespace: str, desired: dict[str, Any], role: RoleSpec,
                     plan: ReplicaPlan, body: kopf.Body, reason: str = "") -> list[dict[str, Any]]:
    """Create, roll (the pod template changed) or scale (only replicas changed) one
    Deployment; returns the scaling decisions taken."""
    name = desired["metadata"]["name"]
    replicas = desired["spec"]["replicas"]
    reason = reason or ("; ".join(plan.limited) if replicas != role.replicas else f"spec.roles.{role.name}.replicas")
    current = _read(apps.read_namespaced_deployment, name, namespace)
    if current is None:
        apps.create_namespaced_deployment(namespace, desired, _preload_content=False)
        kopf.info(body, reason="Created", message=f"Deployment {name} created with {replicas} replicas ({reason})")
        return [scaling_decision(role.name, 0, replicas, reason)]
    template_hash = desired["metadata"]["annotations"][children.TEMPLATE_HASH]
    current_hash = (current["metadata"].get("annotations") or {}).get(children.TEMPLATE_HASH)
    current_replicas = (current.get("spec") or {}).get("replicas")
    if current_hash != template_hash or not _owned(current, desired):
        apps.patch_namespaced_deployment(name, namespace, {"metadata": desired["metadata"], "spec": desired["spec"]},
                                         _content_type=MERGE_PATCH, _preload_content=False)
        kopf.info(body, reason="RollingUpdate",
                  message=f"Deployment {name}: pod template changed ({current_hash} -> {template_hash}), rolling")
    elif current_replicas != replicas:
        apps.patch_namespaced_deployment(name, namespace, {"spec": {"replicas": replicas}},
                                         _content_type=MERGE_PATCH, _preload_content=False)
    if current_replicas == replicas:
        return []
    kopf.info(body, reason="Scaled", message=f"Deployment {name} scaled {current_replicas} -> {replicas} ({reason})")
    return [scaling_decision(role.name, current_replicas or 0, replicas, reason)]


def apply_service(core: Any, namespace: str, desired: dict[str, Any]) -> str | None:
    name = desired["metadata"]["name"]
    current = _read(core.read_namespaced_service, name, namespace)
    if current is None:
        core.create_namespaced_service(namespace, desired, _preload_content=False)
        return "Created"
    wanted = {key: desired["spec"][key] for key in ("selector", "ports")}
    if all(current.get("spec", {}).get(key) == value for key, value in wanted.items()) and _owned(current, desired):
        return None
    core.patch_namespaced_service(name, namespace, {"metadata": desired["metadata"], "spec": wanted},
                                  _content_type=MERGE_PATCH, _preload_content=False)
    return "Updated"


def remove_role(apps: Any, core: Any, namespace: str, owner: str, role: str) -> bool:
    """Delete a role's Deployment and Service that this resource made, once the role is
    gone from the spec."""
    name = children.role_name(owner, role)
    removed = False
    for read, delete in ((apps.read_namespaced_deployment, apps.delete_namespaced_deployment),
                         (core.read_namespaced_service, core.delete_namespaced_service)):
        current = _read(read, name, namespace)
        labels = (current or {}).get("metadata", {}).get("labels") or {}
        if current is not None and labels.get(children.DEPLOYMENT_LABEL) == owner:
            delete(name, namespace, _preload_content=False)
            removed = True
    return removed


def _owned(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    meta = current.get("metadata") or {}
    wanted = desired["metadata"]
    return (meta.get("ownerReferences") == wanted.get("ownerReferences")
            and all((meta.get("labels") or {}).get(k) == v for k, v in wanted.get("labels", {}).items()))


# --- status ----------------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def scaling_decision(role: str, before: int, after: int, reason: str) -> dict[str, Any]:
    return {"time": now(), "role": role, "from": before, "to": after, "reason": reason}


class Conditions:
    """The status conditions, each kept with its lastTransitionTime until its status flips."""

    def __init__(self, items: Any, generation: int | None):
        self.by_type = {item["type"]: dict(item) for item in items or () if item.get("type") in CONDITION_TYPES}
        self.generation = generation

    def set(self, kind: str, state: str, reason: str, message: str) -> None:
        previous = self.by_type.get(kind) or {}
        changed = previous.get("status") != state
        self.by_type[kind] = {
            "type": kind, "status": state, "reason": reason, "message": message,
            "lastTransitionTime": now() if changed else previous.get("lastTransitionTime", now()),
        }
        if self.generation is not None:
            self.by_type[kind]["observedGeneration"] = self.generation

    @property
    def items(self) -> list[dict[str, Any]]:
        return [self.by_type[kind] for kind in CONDITION_TYPES if kind in self.by_type]


def observe(apps: Any, namespace: str, owner: str, plan: ReplicaPlan) -> dict[str, dict[str, Any]]:
    """Per role: the Deployment's ready and updated replicas and whether it failed."""
    observed = {}
    for role, wanted in plan.replicas.items():
        current = _read(apps.read_namespaced_deployment, children.role_name(owner, role), namespace) or {}
        state = current.get("status") or {}
        failed = [c.get("message") or c.get("reason", "") for c in state.get("conditions") or ()
                  if (c.get("type") == "Progressing" and c.get("status") == "False")
                  or (c.get("type") == "ReplicaFailure" and c.get("status") == "True")]
        observed[role] = {"wanted": wanted, "ready": int(state.get("readyReplicas") or 0),
                          "updated": int(state.get("updatedReplicas") or 0), "failed": failed,
                          "exists": bool(current)}
    return observed


def write_status(patch: kopf.Patch, conditions: Conditions, plan: ReplicaPlan,
                 observed: Mapping[str, Mapping[str, Any]], meta: kopf.Meta, *, paused: bool = False) -> None:
    waiting = [f"{role} {o['ready']}/{o['wanted']}" for role, o in observed.items()
               if o["ready"] < o["wanted"] or o["updated"] < o["wanted"]]
    failed = [f"{role}: {'; '.join(o['failed'])}" for role, o in observed.items() if o["failed"]]
    conditions.set("Ready", "False" if waiting else "True", "Waiting" if waiting else "AllReplicasReady",
                   "waiting for " + ", ".join(waiting) if waiting else "every role has its replicas ready")
    if not paused:
        conditions.set("Progressing", "True" if waiting else "False", "RollingOut" if waiting else "Stable",
                       "rolling out " + ", ".join(waiting) if waiting else "nothing to roll out")
    conditions.set("Degraded", "True" if failed else "False", "DeploymentFailed" if failed else "Healthy",
                   "; ".join(failed) if failed else "no Deployment reports a failure")
    conditions.set("ScalingLimited", "True" if plan.limited else "False",
                   "BudgetExceeded" if plan.limited else "WithinBudget",
                   "; ".join(plan.limited) if plan.limited else "every role has the replicas it asks for")
    patch.status["conditions"] = conditions.items
    patch.status["observedReplicas"] = {role: o["ready"] for role, o in observed.items()}
    patch.status["desiredReplicas"] = dict(plan.replicas)
    patch.status["pdRatio"] = plan.pd_ratio
    if meta.get("generation") is not None:
        patch.status["observedGeneration"] = meta.get("generation")
