"""An LLMDeployment's spec, read with its defaults and checked, and the replica plan:
each role's wanted replicas clamped to [minReplicas, maxReplicas] and fitted into the
budget (total replicas, accelerators)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ROLES = ("router", "prefill", "decode", "kvstore", "expert")
REQUIRED_ROLES = ("router", "prefill", "decode")
DEFAULT_ACCELERATOR_RESOURCE = "nvidia.com/gpu"


class SpecError(ValueError):
    """The spec can never be reconciled as written (the CRD's CEL rules say the same)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RoleSpec:
    name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    resources: Mapping[str, Any]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaPlan:
    replicas: dict[str, int]
    limited: list[str]  # why the plan differs from what the spec asked, one line per cause

    @property
    def pd_ratio(self) -> str:
        return f"{self.replicas.get('prefill', 0)}:{self.replicas.get('decode', 0)}"


def read_roles(spec: Mapping[str, Any]) -> dict[str, RoleSpec]:
    """The roles the spec lists, in ``ROLES`` order; raises SpecError on a bad one."""
    raw_roles = spec.get("roles") or {}
    missing = [name for name in REQUIRED_ROLES if name not in raw_roles]
    if missing:
        raise SpecError(f"spec.roles lacks {', '.join(missing)}")
    roles = {}
    for name in ROLES:
        if name not in raw_roles:
            continue
        raw = raw_roles[name] or {}
        replicas = int(raw.get("replicas", raw.get("minReplicas", 1)))
        min_replicas = int(raw.get("minReplicas", min(replicas, 1)))
        max_replicas = int(raw.get("maxReplicas", max(replicas, min_replicas)))
        if not 0 <= min_replicas <= max_replicas:
            raise SpecError(f"roles.{name}: minReplicas {min_replicas} exceeds maxReplicas {max_replicas}")
        if not min_replicas <= replicas <= max_replicas:
            raise SpecError(f"roles.{name}: replicas {replicas} outside [{min_replicas}, {max_replicas}]")
        roles[name] = RoleSpec(
            name=name, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
            resources={kind: {key: str(value) for key, value in (amounts or {}).items()}
                       for kind, amounts in (raw.get("resources") or {}).items()},
            node_selector=dict(raw.get("nodeSelector") or {}),
            tolerations=tuple(raw.get("tolerations") or ()),
        )
    return roles


def accelerators_of(role: RoleSpec, resource_name: str) -> int:
    """Accelerators one replica of the role asks for (its limit, else its request)."""
    for kind in ("limits", "requests"):
        value = (role.resources.get(kind) or {}).get(resource_name)
        if value is not None:
            try:
                return int(value)
            except ValueError as error:
                raise SpecError(f"roles.{role.name}.resources.{kind}.{resource_name}: {value!r} is not a whole number") from error
    return 0


def plan_replicas(roles: Mapping[str, RoleSpec], budget: Mapping[str, Any] | None) -> ReplicaPlan:
    """Each role's replicas, trimmed when the total (or the accelerators) would exceed the
    budget: the role furthest above its minimum gives one replica back at a time. Minimums
    are kept even over budget; that is reported too."""
    replicas = {name: role.replicas for name, role in roles.items()}
    limited: list[str] = []
    budget = budget or {}
    resource_name = budget.get("acceleratorResource") or DEFAULT_ACCELERATOR_RESOURCE
    per_replica = {name: accelerators_of(role, resource_name) for name, role in roles.items()}
    checks = []
    if budget.get("maxTotalReplicas") is not None:
        checks.append(("replicas", int(budget["maxTotalReplicas"]), {name: 1 for name in roles}))
    if budget.get("accelerators") is not None:
        checks.append((resource_name, int(budget["accelerators"]), per_replica))
    for what, limit, cost in checks:
        asked = sum(replicas[name] * cost[name] for name in roles)
        if asked <= limit:
            continue
        while sum(replicas[name] * cost[name] for name in roles) > limit:
            spare = [name for name in roles if cost[name] and replicas[name] > roles[name].min_replicas]
            if not spare:
                break
            name = max(spare, key=lambda n: (replicas[n] - roles[n].min_replicas, -ROLES.index(n)))
            replicas[name] -= 1
        total = sum(replicas[name] * cost[name] for name in roles)
        if total > limit:
            limited.append(f"the minimum replicas need {total} {what}, over the budget of {limit}")
        else:
            limited.append(f"the roles ask for {asked} {what}, the budget allows {limit}")
    return ReplicaPlan(replicas=replicas, limited=limited)


def shared_config(spec: Mapping[str, Any], defaults: Mapping[str, str]) -> dict[str, str]:
    """The ConfigMap's data: the environment every role reads (``CLEAVE_<FIELD>``, the
    same keys as the services' flags)."""
    model = spec.get("model") or {}
    if not model.get("name"):
        raise SpecError("spec.model.name is required")
    if bool(model.get("image")) == bool(model.get("path")):
        raise SpecError("spec.model needs exactly one of image and path")
    connections = spec.get("connections") or {}
    data = {
        "CLEAVE_MODEL": model_path(model),
        "CLEAVE_SERVED_MODEL_NAME": model["name"],
        "CLEAVE_REDIS_URL": connections.get("redisUrl") or defaults.get("redis_url", ""),
        "CLEAVE_EVENTS_BOOTSTRAP": connections.get("eventsBootstrap") or defaults.get("events_bootstrap", ""),
    }
    for target in ("ttft", "tpot"):
        raw = (spec.get("targets") or {}).get(target)
        if raw:
            data[f"CLEAVE_{target.upper()}_TARGET_SECONDS"] = _number(raw["seconds"])
            data[f"CLEAVE_{target.upper()}_TARGET_PERCENTILE"] = _number(raw["percentile"])
    return data


MODELS_MOUNT = "/models"


def model_path(model: Mapping[str, Any]) -> str:
    if model.get("image"):
        return f"{MODELS_MOUNT}/{model['name']}"
    path = str(model["path"])
    if model.get("persistentVolumeClaim"):
        return f"{MODELS_MOUNT}/{path.lstrip('/')}"
    return path


def _number(value: Any) -> str:
    return f"{float(value):g}"
