"""The operator (cleave.operator) against kmock, an in-memory Kubernetes API emulator:
no real kube-apiserver can run on this machine, so kmock stands in for it. kopf runs
in-process (``kopf.operator``) against kmock's URL, exactly as it would against a cluster.

What kmock does not do, and so these tests do not claim: it runs no controllers (no
garbage collector deletes children when their owner goes: the tests check the owner
references the real collector follows; no Deployment controller: a test writes a
Deployment's status as that controller would), and it does not enforce the CRD's schema
(the schema is checked here with ``jsonschema`` against sample resources). ``ApiServer``
below adds the three server behaviours the operator relies on: ``metadata.uid`` and
``generation`` on create, ``generation`` bumped by a spec change, ``generateName``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import itertools
import json
import threading
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import jsonpatch
import jsonschema
import kmock
import pytest
import pytest_asyncio
import yaml

os.environ.setdefault("CLEAVE_OPERATOR_STATUS_INTERVAL", "0.3")

import kopf  # noqa: E402
import kubernetes  # noqa: E402

from cleave.operator import children, handlers, scaling  # noqa: E402
from cleave.operator.spec import SpecError, plan_replicas, read_roles  # noqa: E402
from fake_http import FakeJSONServer  # noqa: E402

CRD_PATH = Path(__file__).resolve().parents[1] / "charts/cleave/crds/llmdeployments.cleave.dev.yaml"
NS = "serving"
LLMD = kmock.resource("cleave.dev", "v1alpha1", "llmdeployments")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
EVENTS = kmock.resource("", "v1", "events")
API_URL: dict[str, str] = {}
WAIT_SECONDS = 30


@kopf.on.login()
def login_to_kmock(**_: Any) -> kopf.ConnectionInfo:
    config = kubernetes.client.Configuration(host=API_URL["url"])
    kubernetes.client.Configuration.set_default(config)
    return kopf.ConnectionInfo(server=API_URL["url"], insecure=True)


class ApiServer(kmock.KubernetesEmulator):
    """kmock plus what the API server adds to objects and the operator relies on."""

    _counter = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{next(self._counter)}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = str(next(self._counter))
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            version = str(next(self._counter))
            if isinstance(data, list):  # a JSON patch (kopf's, guarded by a resourceVersion test)
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            elif isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                key = (request.resource, request.namespace, request.name)
                if "spec" in data and not request.subresource and key in self.objects:
                    meta["generation"] = self.objects[key].get("metadata", {}).get("generation", 1) + 1
        return await super()._handle(request)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """A watch from a listed resourceVersion streams only later changes, as the server
        does (kmock replays the existing objects first, which kopf would see twice)."""
        if "resourceVersion" not in request.params:
            async for item in super()._serve_watch(request):
                yield item
            return
        yield b""
        async for event in self._buses[request.resource]:
            meta = event.get("object", {}).get("metadata", {})
            if request.namespace in (None, meta.get("namespace")) and request.name in (None, meta.get("name")):
                yield event

    async def _render_error(self, exc: Exception) -> Any:
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):  # a stale resourceVersion, as the server says it
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        return await super()._render_error(exc)


@pytest_asyncio.fixture()
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        server.resources["cleave.dev/v1alpha1/llmdeployments"] = kmock.ResourceInfo(
            kind="LLMDeployment", singular="llmdeployment", namespaced=True, subresources={"status"},
            verbs={"list", "watch", "get", "patch", "create", "delete"})
        server.resources["apps/v1/deployments"] = kmock.ResourceInfo(kind="Deployment", namespaced=True)
        # Discovered but never listed: kopf waits for them to exist (scanning is disabled).
        server.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False)
        server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
            kind="CustomResourceDefinition", namespaced=False)
        for plural, kind in (("services", "Service"), ("configmaps", "ConfigMap"), ("events", "Event")):
            server.resources[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True)
        API_URL["url"] = str(server.url).rstrip("/")
        yield server


@contextlib.asynccontextmanager
async def operator() -> AsyncIterator[None]:
    """kopf in its own thread and event loop, as ``kopf.testing.KopfRunner`` does: at exit
    kopf cancels every task of its loop, and kmock's server lives in the test's loop."""
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(standalone=True, namespaces=[NS], stop_flag=stop, ready_flag=ready))
        except BaseException as error:  # surfaced in the test below
            failures.append(error)
            ready.set()

    thread = threading.Thread(target=run, name="kopf", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, WAIT_SECONDS), "kopf did not start"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, WAIT_SECONDS)
        assert not thread.is_alive(), "kopf did not stop"
        assert not failures, failures
        gc.collect()  # kopf's loop is gone: its aiohttp leftovers warn now, inside the test, not at exit


async def eventually(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns something true (a condition, not a pause)."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def sample(name: str = "smol", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "cleave.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"name": "smollm2", "image": "registry.example/models/smollm2:1"},
            "roles": {
                "router": {"replicas": 1},
                "prefill": {"replicas": 1, "maxReplicas": 4},
                "decode": {"replicas": 2, "minReplicas": 1, "maxReplicas": 8},
                "kvstore": {"replicas": 1},
            },
            "targets": {"ttft": {"percentile": 90, "seconds": 0.5}, "tpot": {"percentile": 90, "seconds": 0.05}},
        },
    }
    body["spec"].update(spec)
    return body


def objects(api: ApiServer, resource: Any) -> dict[str, dict[str, Any]]:
    return {name: obj.raw for (res, ns, name), obj in list(api.objects.items())
            if res == resource and ns == NS and not obj.deleted}


def without_versions(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The objects less what the API server bumps on writes."""
    result = copy.deepcopy(objs)
    for obj in result.values():
        obj["metadata"].pop("resourceVersion", None)
        obj["metadata"].pop("generation", None)
    return result


def get(api: ApiServer, resource: Any, name: str) -> dict[str, Any] | None:
    key = (resource, NS, name)
    return api.objects[key].raw if key in api.objects and not api.objects[key].deleted else None


def versions(api: ApiServer, resource: Any, name: str) -> int:
    return len(api.objects[resource, NS, name].history)


def posted_events(api: ApiServer) -> list[dict[str, Any]]:
    return [obj.raw for (res, ns, _), obj in list(api.objects.items()) if res == EVENTS]


def condition(body: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for item in ((body or {}).get("status") or {}).get("conditions") or ():
        if item["type"] == kind:
            return item
    return {}


async def create(api: ApiServer, body: dict[str, Any]) -> None:
    response = await api.post(f"/apis/cleave.dev/v1alpha1/namespaces/{NS}/llmdeployments", json=body)
    assert response.status == 200, await response.text()


async def patch_spec(api: ApiServer, name: str, spec: dict[str, Any]) -> None:
    response = await api.patch(f"/apis/cleave.dev/v1alpha1/namespaces/{NS}/llmdeployments/{name}",
                               json={"spec": spec}, headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 200, await response.text()


def handled(api: ApiServer, name: str) -> bool:
    """kopf has stored the spec it last handled, and it is the current spec."""
    body = get(api, LLMD, name) or {}
    stored = (body.get("metadata", {}).get("annotations") or {}).get("cleave.dev/last-handled-configuration")
    return bool(stored) and yaml.safe_load(stored).get("spec") == body.get("spec")


ROLE_NAMES = ["smol-router", "smol-prefill", "smol-decode", "smol-kvstore"]


@pytest.mark.asyncio
async def test_create_makes_owned_children_status_and_events(api: ApiServer) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        owner = get(api, LLMD, "smol")
        await eventually(lambda: condition(get(api, LLMD, "smol"), "Ready"), "status")
    deployments, services = objects(api, DEPLOYMENTS), objects(api, SERVICES)
    config_maps = objects(api, CONFIGMAPS)
    assert sorted(deployments) == sorted(services) == sorted(ROLE_NAMES)
    assert list(config_maps) == ["smol-config"]
    for obj in [*deployments.values(), *services.values(), *config_maps.values()]:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "cleave.dev/v1alpha1", "kind": "LLMDeployment", "name": "smol",
                       "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "smol"
    decode = deployments["smol-decode"]
    assert decode["spec"]["replicas"] == 2
    assert decode["metadata"]["labels"]["cleave.dev/role"] == "decode"
    assert decode["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": "smol", "cleave.dev/role": "decode"}
    template = decode["spec"]["template"]
    assert template["metadata"]["annotations"][children.CONFIG_HASH] == \
        config_maps["smol-config"]["metadata"]["annotations"][children.CONFIG_HASH]
    assert template["spec"]["containers"][0]["args"] == ["decode"]
    assert template["spec"]["initContainers"][0]["image"] == "registry.example/models/smollm2:1"
    assert config_maps["smol-config"]["data"]["CLEAVE_MODEL"] == "/models/smollm2"
    assert config_maps["smol-config"]["data"]["CLEAVE_TTFT_TARGET_SECONDS"] == "0.5"
    assert services["smol-router"]["spec"]["ports"][0] == {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    status = get(api, LLMD, "smol")["status"]
    assert status["desiredReplicas"] == {"router": 1, "prefill": 1, "decode": 2, "kvstore": 1}
    assert status["pdRatio"] == "1:2"
    assert status["observedReplicas"] == {"router": 0, "prefill": 0, "decode": 0, "kvstore": 0}
    assert condition(get(api, LLMD, "smol"), "Ready")["status"] == "False"  # nothing runs pods in kmock
    assert condition(get(api, LLMD, "smol"), "Progressing")["status"] == "True"
    assert condition(get(api, LLMD, "smol"), "ScalingLimited")["status"] == "False"
    assert status["lastScalingDecision"]["to"] >= 1
    reasons = [event["reason"] for event in posted_events(api)]
    assert reasons.count("Created") == 8 and "ConfigChanged" in reasons
    assert all(event["involvedObject"]["uid"] == owner["metadata"]["uid"] for event in posted_events(api))


@pytest.mark.asyncio
async def test_status_follows_the_deployments(api: ApiServer) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        for name in ROLE_NAMES:  # what the Deployment controller would write
            replicas = get(api, DEPLOYMENTS, name)["spec"]["replicas"]
            response = await api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", json={
                "status": {"readyReplicas": replicas, "updatedReplicas": replicas, "replicas": replicas}})
            assert response.status == 200
        await eventually(lambda: condition(get(api, LLMD, "smol"), "Ready").get("status") == "True", "Ready")
        assert get(api, LLMD, "smol")["status"]["observedReplicas"] == {"router": 1, "prefill": 1, "decode": 2, "kvstore": 1}
        response = await api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/smol-decode/status", json={
            "status": {"readyReplicas": 1, "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": "ReplicaSet has timed out progressing"}]}})
        assert response.status == 200
        await eventually(lambda: condition(get(api, LLMD, "smol"), "Degraded").get("status") == "True", "Degraded")
    assert "timed out" in condition(get(api, LLMD, "smol"), "Degraded")["message"]
    assert condition(get(api, LLMD, "smol"), "Ready")["status"] == "False"


@pytest.mark.asyncio
async def test_replicas_change_only_scales_that_deployment(api: ApiServer) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        before = copy.deepcopy(objects(api, DEPLOYMENTS))
        counts = {name: versions(api, DEPLOYMENTS, name) for name in ROLE_NAMES}
        config_versions = versions(api, CONFIGMAPS, "smol-config")
        await patch_spec(api, "smol", {"roles": {"decode": {"replicas": 5}}})
        await eventually(lambda: get(api, DEPLOYMENTS, "smol-decode")["spec"]["replicas"] == 5, "the scale")
        await eventually(lambda: handled(api, "smol"), "the update handled")
        await eventually(lambda: get(api, LLMD, "smol")["status"].get("pdRatio") == "1:5", "the ratio")
    after = objects(api, DEPLOYMENTS)
    assert after["smol-decode"]["spec"]["template"] == before["smol-decode"]["spec"]["template"]
    assert versions(api, DEPLOYMENTS, "smol-decode") == counts["smol-decode"] + 1
    for name in ROLE_NAMES[:2] + ROLE_NAMES[3:]:
        assert versions(api, DEPLOYMENTS, name) == counts[name], name
        assert after[name] == before[name]
    assert versions(api, CONFIGMAPS, "smol-config") == config_versions
    decision = get(api, LLMD, "smol")["status"]["lastScalingDecision"]
    assert (decision["role"], decision["from"], decision["to"]) == ("decode", 2, 5)
    assert decision["reason"] == "spec.roles.decode.replicas"
    assert any(e["reason"] == "Scaled" and "2 -> 5" in e["message"] for e in posted_events(api))


@pytest.mark.parametrize("change", [
    {"targets": {"ttft": {"percentile": 99, "seconds": 1.5}}},
    {"model": {"name": "smollm2-moe", "image": "registry.example/models/smollm2-moe:1"}},
])
@pytest.mark.asyncio
async def test_config_change_rolls_every_role(api: ApiServer, change: dict[str, Any]) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        hashes = {name: dep["spec"]["template"]["metadata"]["annotations"][children.CONFIG_HASH]
                  for name, dep in objects(api, DEPLOYMENTS).items()}
        data = copy.deepcopy(get(api, CONFIGMAPS, "smol-config")["data"])
        await patch_spec(api, "smol", change)
        await eventually(lambda: get(api, CONFIGMAPS, "smol-config")["data"] != data, "the ConfigMap")
        await eventually(lambda: handled(api, "smol"), "the update handled")
    config_map = get(api, CONFIGMAPS, "smol-config")
    new_hash = config_map["metadata"]["annotations"][children.CONFIG_HASH]
    for name, dep in objects(api, DEPLOYMENTS).items():
        assert dep["spec"]["template"]["metadata"]["annotations"][children.CONFIG_HASH] == new_hash != hashes[name]
        assert dep["spec"]["replicas"] == {"smol-decode": 2}.get(name, 1)
    if "targets" in change:
        assert config_map["data"]["CLEAVE_TTFT_TARGET_SECONDS"] == "1.5"
        assert config_map["data"]["CLEAVE_TTFT_TARGET_PERCENTILE"] == "99"
    else:
        assert config_map["data"]["CLEAVE_MODEL"] == "/models/smollm2-moe"
    assert sum(e["reason"] == "RollingUpdate" for e in posted_events(api)) == 4


@pytest.mark.asyncio
async def test_restart_resumes_without_duplicates(api: ApiServer) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
    snapshot = {res: without_versions(objects(api, res)) for res in (DEPLOYMENTS, SERVICES, CONFIGMAPS)}
    counts = {name: versions(api, DEPLOYMENTS, name) for name in ROLE_NAMES}
    # While the operator is down, someone scales decode by hand: the resumed operator
    # puts the spec's replicas back, touching nothing else.
    response = await api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/smol-decode", json={"spec": {"replicas": 7}})
    assert response.status == 200
    async with operator():
        await eventually(lambda: get(api, DEPLOYMENTS, "smol-decode")["spec"]["replicas"] == 2, "the resume")
    for res, before in snapshot.items():
        assert without_versions(objects(api, res)) == before
    for name in ROLE_NAMES:
        assert versions(api, DEPLOYMENTS, name) == counts[name] + (2 if name == "smol-decode" else 0)


@pytest.mark.asyncio
async def test_paused_changes_nothing_until_resumed(api: ApiServer) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        before = copy.deepcopy(objects(api, DEPLOYMENTS))
        await patch_spec(api, "smol", {"paused": True, "roles": {"decode": {"replicas": 4}}})
        await eventually(lambda: handled(api, "smol"), "the update handled")
        await eventually(lambda: condition(get(api, LLMD, "smol"), "Progressing").get("reason") == "Paused", "Paused")
        assert objects(api, DEPLOYMENTS) == before
        # kopf posts events from a task of its own, after the status patch.
        await eventually(lambda: any(e["reason"] == "Paused" for e in posted_events(api)), "the Paused event")
        assert objects(api, DEPLOYMENTS) == before
        await patch_spec(api, "smol", {"paused": False})
        await eventually(lambda: get(api, DEPLOYMENTS, "smol-decode")["spec"]["replicas"] == 4, "the unpause")


@pytest.mark.asyncio
async def test_budget_trims_replicas_and_reports_scaling_limited(api: ApiServer) -> None:
    async with operator():
        await create(api, sample(autoscaling={"budget": {"maxTotalReplicas": 4}}))
        await eventually(lambda: condition(get(api, LLMD, "smol"), "ScalingLimited").get("status") == "True",
                         "ScalingLimited")
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        replicas = {name: dep["spec"]["replicas"] for name, dep in objects(api, DEPLOYMENTS).items()}
        assert replicas == {"smol-router": 1, "smol-prefill": 1, "smol-decode": 1, "smol-kvstore": 1}
        assert "ask for 5 replicas, the budget allows 4" in condition(get(api, LLMD, "smol"), "ScalingLimited")["message"]
        await eventually(lambda: any(e["reason"] == "ScalingLimited" and e["type"] == "Warning"
                                     for e in posted_events(api)), "the Warning event")


@pytest.mark.asyncio
async def test_removed_role_and_deletion(api: ApiServer) -> None:
    async with operator():
        await create(api, sample())
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        await patch_spec(api, "smol", {"roles": {"kvstore": None}})
        await eventually(lambda: get(api, DEPLOYMENTS, "smol-kvstore") is None
                         and get(api, SERVICES, "smol-kvstore") is None, "the kvstore removed")
        # kopf's own finalizer (it stops the status timer) is the only one; the children are
        # left to the garbage collector, through their owner references (kmock runs none).
        assert get(api, LLMD, "smol")["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        response = await api.delete(f"/apis/cleave.dev/v1alpha1/namespaces/{NS}/llmdeployments/smol")
        assert response.status == 200
        await eventually(lambda: get(api, LLMD, "smol") is None, "kopf to release its finalizer")
    uid = api.objects[LLMD, NS, "smol"].history[0]["metadata"]["uid"]
    for res in (DEPLOYMENTS, SERVICES, CONFIGMAPS):
        for obj in objects(api, res).values():
            assert [ref["uid"] for ref in obj["metadata"]["ownerReferences"] if ref.get("controller")] == [uid]


@pytest.mark.asyncio
async def test_invalid_spec_is_reported_not_applied(api: ApiServer) -> None:
    bad = sample()
    bad["spec"]["roles"]["decode"] = {"replicas": 9, "maxReplicas": 8}
    async with operator():
        await create(api, bad)
        await eventually(lambda: condition(get(api, LLMD, "smol"), "Degraded").get("reason") == "InvalidSpec", "Degraded")
    assert objects(api, DEPLOYMENTS) == {}
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in posted_events(api))


# --- the CRD's schema (kmock does not enforce it) ----------------------------------------

def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def test_crd_names_and_subresources() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["metadata"]["name"] == "llmdeployments.cleave.dev"
    assert crd["spec"]["names"]["kind"] == "LLMDeployment" and crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Model", "P:D", "Ready", "Age"}


def test_crd_accepts_the_samples() -> None:
    schema = crd_schema()
    jsonschema.validate(sample(), schema)
    full = sample(paused=True, autoscaling={
        "policy": {"enabled": True, "scaleUpStep": 2, "scaleDownStep": 1, "cooldownSeconds": 120},
        "budget": {"maxTotalReplicas": 20, "accelerators": 8}})
    full["spec"]["model"] = {"name": "m", "path": "smollm2", "persistentVolumeClaim": "models"}
    full["spec"]["roles"]["expert"] = {
        "replicas": 2, "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}, "requests": {"cpu": "500m"}},
        "nodeSelector": {"accelerator": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    full["status"] = {"observedReplicas": {"decode": 2}, "pdRatio": "1:2", "observedGeneration": 3,
                      "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                                      "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                      "lastScalingDecision": {"time": "2026-01-01T00:00:00Z", "role": "decode",
                                              "from": 1, "to": 2, "reason": "spec"}}
    jsonschema.validate(full, schema)


def _bad(path: str, value: Any) -> dict[str, Any]:
    body = sample()
    *parents, leaf = path.split(".")
    node = body["spec"]
    for key in parents:
        node = node.setdefault(key, {})
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return body


@pytest.mark.parametrize("body", [
    pytest.param(_bad("model", KeyError), id="no-model"),
    pytest.param(_bad("model.name", KeyError), id="no-model-name"),
    pytest.param(_bad("model.image", KeyError), id="model-neither-image-nor-path"),
    pytest.param(_bad("model.path", "a"), id="model-both-image-and-path"),
    pytest.param(_bad("roles.decode", KeyError), id="no-decode-role"),
    pytest.param(_bad("roles.decode.replicas", -1), id="negative-replicas"),
    pytest.param(_bad("roles.decode.replicas", 1001), id="too-many-replicas"),
    pytest.param(_bad("roles.decode.replicas", "two"), id="replicas-not-integer"),
    pytest.param(_bad("roles.prefill.tolerations", [{"operator": "Sometimes"}]), id="bad-toleration-operator"),
    pytest.param(_bad("roles.prefill.resources", {"limits": {"cpu": "lots"}}), id="bad-quantity"),
    pytest.param(_bad("targets.ttft", {"percentile": 90}), id="target-without-seconds"),
    pytest.param(_bad("targets.ttft", {"percentile": 100.5, "seconds": 1}), id="percentile-over-100"),
    pytest.param(_bad("targets.tpot", {"percentile": 90, "seconds": 0}), id="zero-seconds"),
    pytest.param(_bad("autoscaling.policy", {"cooldownSeconds": -5}), id="negative-cooldown"),
    pytest.param(_bad("autoscaling.budget", {"maxTotalReplicas": 0}), id="zero-budget"),
    pytest.param(_bad("paused", "yes"), id="paused-not-boolean"),
])
def test_crd_rejects_bad_resources(body: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, crd_schema())


def test_crd_rejects_bad_status() -> None:
    body = sample()
    body["status"] = {"conditions": [{"type": "Happy", "status": "True"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, crd_schema())


# --- the replica plan (no API involved) ---------------------------------------------------

@pytest.mark.parametrize("roles, budget, replicas, limited", [
    ({"router": {"replicas": 1}, "prefill": {"replicas": 2}, "decode": {"replicas": 3}}, None,
     {"router": 1, "prefill": 2, "decode": 3}, False),
    ({"router": {"replicas": 1}, "prefill": {"replicas": 2}, "decode": {"replicas": 3}}, {"maxTotalReplicas": 4},
     {"router": 1, "prefill": 1, "decode": 2}, True),
    ({"router": {"replicas": 1, "minReplicas": 1}, "prefill": {"replicas": 2, "minReplicas": 2},
      "decode": {"replicas": 2, "minReplicas": 2}}, {"maxTotalReplicas": 3},
     {"router": 1, "prefill": 2, "decode": 2}, True),
    ({"router": {"replicas": 1}, "prefill": {"replicas": 2, "resources": {"limits": {"nvidia.com/gpu": 2}}},
      "decode": {"replicas": 4, "resources": {"limits": {"nvidia.com/gpu": 1}}}}, {"accelerators": 6},
     {"router": 1, "prefill": 2, "decode": 2}, True),
])
def test_plan_replicas(roles: dict[str, Any], budget: dict[str, Any] | None, replicas: dict[str, int],
                       limited: bool) -> None:
    plan = plan_replicas(read_roles({"roles": roles}), budget)
    assert plan.replicas == replicas
    assert bool(plan.limited) == limited


def test_read_roles_rejects_what_the_cel_rules_reject() -> None:
    with pytest.raises(SpecError):
        read_roles({"roles": {"router": {}, "prefill": {}, "decode": {"minReplicas": 3, "maxReplicas": 2}}})
    with pytest.raises(SpecError):
        read_roles({"roles": {"router": {}, "prefill": {}}})


@pytest.mark.parametrize("model", [
    {"name": "m", "image": "registry.example/models/m:1"},
    {"name": "m", "path": "m", "persistentVolumeClaim": "models"},
    {"name": "m", "path": "/opt/models/m"},
])
def test_children_load_into_the_kubernetes_models(model: dict[str, Any]) -> None:
    roles = read_roles({"roles": {
        "router": {}, "prefill": {}, "decode": {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
                                                "nodeSelector": {"accelerator": "h100"},
                                                "tolerations": [{"key": "gpu", "operator": "Exists"}]},
        "kvstore": {}, "expert": {}}})
    for role in roles.values():
        deployment = children.deployment("m", role, 1, image="cleave:0.1.0", pull_policy="IfNotPresent",
                                         model=model, config_hash="0")
        parsed = kubernetes.client.V1Deployment.from_dict(deployment)
        container = parsed.spec.template.spec.containers[0]
        assert container.args == [role.name]
        # A read-only root: every path the image writes to is a volume.
        assert container.security_context.read_only_root_filesystem
        assert {"/tmp", children.CACHE_MOUNT} <= {mount.mount_path for mount in container.volume_mounts}
        if role.name == "decode":
            assert parsed.spec.template.spec.containers[0].resources.limits == {"nvidia.com/gpu": "1", "memory": "8Gi"}
        env = {e.name: e.value for e in container.env}
        if role.name == "expert":  # RunExperts' stream on a fixed, declared port
            assert env["CLEAVE_STREAM_PORT"] == "50091"
            assert ("stream", 50091) in {(port.name, port.container_port) for port in container.ports}
        else:
            assert "CLEAVE_STREAM_PORT" not in env
        kubernetes.client.V1Service.from_dict(children.service("m", role.name))
    kubernetes.client.V1ConfigMap.from_dict(children.config_map("m", {"CLEAVE_MODEL": "/models/m"}))


# --- the scaling controller ----------------------------------------------------------------

TARGETS = {"ttft": scaling.Target(90, 0.5), "tpot": scaling.Target(90, 0.05)}
BOUNDS = {"prefill": (1, 4), "decode": (1, 8)}
ON = scaling.Policy(enabled=True, cooldown_seconds=60)
BUSY_PREFILL = scaling.Metrics(ttft=0.9, tpot=0.03, prefill_waiting=6, decode_running=4, decode_waiting=0)
BUSY_DECODE = scaling.Metrics(ttft=0.3, tpot=0.08, prefill_waiting=0, decode_running=16, decode_waiting=3)
IDLE = scaling.Metrics(ttft=0.1, tpot=0.005, prefill_waiting=0, decode_running=1, decode_waiting=0)


@pytest.mark.parametrize("case, expected", [
    pytest.param({}, ("prefill", 1, 2, "TTFT p90 0.9 s over 0.5 s with 6 prefill requests waiting"), id="ttft-adds-prefill"),
    pytest.param({"policy": scaling.Policy(enabled=True, scale_up_step=2, cooldown_seconds=60)},
                 ("prefill", 1, 3, "TTFT p90"), id="scale-up-step"),
    pytest.param({"metrics": BUSY_DECODE}, ("decode", 2, 3, "TPOT p90 0.08 s over 0.05 s"), id="tpot-adds-decode"),
    pytest.param({"metrics": scaling.Metrics(ttft=0.9, tpot=0.03, prefill_waiting=0)}, None,
                 id="ttft-breach-without-prefill-queue-holds"),
    pytest.param({"metrics": scaling.Metrics(ttft=0.3, tpot=0.08, decode_running=3, decode_waiting=0)}, None,
                 id="tpot-breach-decode-not-saturated-holds"),
    pytest.param({"metrics": IDLE, "replicas": {"prefill": 2, "decode": 3}},
                 ("decode", 3, 2, "under 50% of their targets"), id="idle-removes-from-idlest"),
    pytest.param({"metrics": scaling.Metrics(ttft=0.05, tpot=0.02), "replicas": {"prefill": 2, "decode": 3}},
                 ("prefill", 2, 1, "prefill is the idlest pool"), id="idle-prefill-idlest"),
    pytest.param({"metrics": IDLE, "replicas": {"prefill": 1, "decode": 1}}, None, id="idle-at-min-holds"),
    pytest.param({"metrics": IDLE, "replicas": {"prefill": 2, "decode": 1}},
                 ("prefill", 2, 1, "idlest"), id="idle-idlest-at-min-other-gives"),
    pytest.param({"metrics": scaling.Metrics(ttft=0.3, tpot=0.02)}, None, id="in-band-holds"),
    pytest.param({"replicas": {"prefill": 4, "decode": 2}},
                 ("prefill", 4, 4, "at maxReplicas 4", True), id="max-limited"),
    pytest.param({"max_total": 3}, ("prefill", 1, 1, "the budget of 3 replicas is used", True), id="budget-limited"),
    pytest.param({"max_total": 4, "policy": scaling.Policy(enabled=True, scale_up_step=3, cooldown_seconds=0)},
                 ("prefill", 1, 2, "TTFT"), id="budget-trims-step"),
    pytest.param({"last_decision": 1000 - 30}, None, id="cooldown"),
    pytest.param({"last_decision": 1000 - 60}, ("prefill", 1, 2, "TTFT"), id="cooldown-over"),
    pytest.param({"paused": True}, None, id="paused"),
    pytest.param({"policy": scaling.Policy(enabled=False)}, None, id="disabled"),
    pytest.param({"metrics": None}, None, id="metrics-unavailable"),
    pytest.param({"metrics": scaling.Metrics(prefill_waiting=5, decode_waiting=5)}, None, id="no-latency-samples"),
    pytest.param({"targets": {}}, None, id="no-targets"),
])
def test_decide(case: dict[str, Any], expected: tuple | None) -> None:
    args = {"targets": TARGETS, "policy": ON, "replicas": {"prefill": 1, "decode": 2}, "bounds": BOUNDS,
            "metrics": BUSY_PREFILL, "now": 1000.0, "last_decision": None, "paused": False, "max_total": None}
    args.update(case)
    decision = scaling.decide(**args)
    if expected is None:
        assert decision is None
        return
    role, before, after, reason, *limited = expected
    assert decision is not None
    assert (decision.role, decision.before, decision.after) == (role, before, after)
    assert reason in decision.reason and decision.limited == bool(limited)


class FakePrometheus(FakeJSONServer):
    """/api/v1/query on 127.0.0.1 answering canned vectors by metric name: a real
    Prometheus cannot be fed a synthetic SLO breach quickly."""

    def __init__(self, values: dict[str, float]):
        self.values, self.queries = values, []
        super().__init__(self.respond)

    def respond(self, path: str, params: dict[str, list[str]]) -> tuple[int, Any]:
        query = params["query"][0]
        self.queries.append(query)
        result = [{"metric": {}, "value": [0, str(value)]} for name, value in self.values.items() if name in query]
        return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}


def test_prometheus_client_reads_the_documented_metrics() -> None:
    with FakePrometheus({"time_to_first_token": 0.9, "inter_token": 0.03, "prefill_waiting": 6,
                         "decode_running": 4, "decode_waiting": 0}) as prometheus:
        metrics = scaling.PrometheusClient(prometheus.url).metrics(TARGETS)
    assert metrics == BUSY_PREFILL
    assert "histogram_quantile(0.9, sum by (le) (rate(cleave_router_time_to_first_token_seconds_bucket[2m])))" \
        in prometheus.queries
    unreachable = scaling.PrometheusClient(prometheus.url, timeout=2)
    assert unreachable.metrics(TARGETS) is None and "cannot be read" in unreachable.error


def test_push_decision_keeps_the_newest_hundred_and_survives_a_dead_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    calls: list[tuple] = []

    class FakeRedis:
        def lpush(self, *args: Any) -> None:
            calls.append(("lpush", *args))

        def ltrim(self, *args: Any) -> None:
            calls.append(("ltrim", *args))

        def close(self) -> None:
            pass

    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, url, **_: FakeRedis()))
    assert scaling.push_decision("redis://example:6379/0", {"ts": 1.5, "role": "decode", "from": 2, "to": 3, "reason": "r"})
    assert calls[0][:2] == ("lpush", "cleave:scaling:decisions") and json.loads(calls[0][2])["to"] == 3
    assert calls[1] == ("ltrim", "cleave:scaling:decisions", 0, 99)
    monkeypatch.undo()
    assert not scaling.push_decision("redis://127.0.0.1:1/0", {"ts": 1.5})  # refused: logged, not raised
    assert not scaling.push_decision("", {"ts": 1.5})


def autoscaled(cooldown: int) -> dict[str, Any]:
    return sample(autoscaling={"policy": {"enabled": True, "cooldownSeconds": cooldown}})


@pytest.mark.asyncio
async def test_ttft_breach_scales_prefill_up_by_one(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakePrometheus({"time_to_first_token": 0.9, "inter_token": 0.03, "prefill_waiting": 6,
                         "decode_running": 4, "decode_waiting": 0}) as prometheus:
        monkeypatch.setenv("CLEAVE_PROMETHEUS_URL", prometheus.url)
        async with operator():
            # A long cooldown: creating the Deployments is a decision too, so the test moves
            # that decision into the past; after the one step the cooldown holds everything.
            await create(api, autoscaled(cooldown=3600))
            await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
            await eventually(lambda: (get(api, LLMD, "smol").get("status") or {}).get("lastScalingDecision"), "status")
            response = await api.patch(f"/apis/cleave.dev/v1alpha1/namespaces/{NS}/llmdeployments/smol/status", json={
                "status": {"lastScalingDecision": {"time": "2000-01-01T00:00:00Z", "role": "kvstore",
                                                   "from": 0, "to": 1, "reason": "created"}}},
                headers={"Content-Type": "application/merge-patch+json"})
            assert response.status == 200
            await eventually(lambda: get(api, DEPLOYMENTS, "smol-prefill")["spec"]["replicas"] == 2, "the scale up")
            await eventually(lambda: get(api, LLMD, "smol")["status"]["lastScalingDecision"]["role"] == "prefill",
                             "the decision in status")
            await eventually(lambda: get(api, LLMD, "smol")["status"].get("pdRatio") == "2:2", "the ratio")
    status = get(api, LLMD, "smol")["status"]
    decision = status["lastScalingDecision"]
    assert (decision["from"], decision["to"]) == (1, 2)
    assert decision["reason"] == "TTFT p90 0.9 s over 0.5 s with 6 prefill requests waiting"
    assert status["desiredReplicas"]["prefill"] == 2
    assert get(api, DEPLOYMENTS, "smol-decode")["spec"]["replicas"] == 2
    scaled = [e for e in posted_events(api) if e["reason"] == "Scaled"]
    assert [e["message"] for e in scaled] == [f"Deployment smol-prefill scaled 1 -> 2 ({decision['reason']})"]


@pytest.mark.asyncio
async def test_unreachable_prometheus_changes_nothing(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakePrometheus({}) as prometheus:
        url = prometheus.url  # closed on exit: nothing listens there any more
    monkeypatch.setenv("CLEAVE_PROMETHEUS_URL", url)
    async with operator():
        await create(api, autoscaled(cooldown=0))
        await eventually(lambda: len(objects(api, DEPLOYMENTS)) == 4 and handled(api, "smol"), "the Deployments")
        before = copy.deepcopy(objects(api, DEPLOYMENTS))
        await eventually(lambda: condition(get(api, LLMD, "smol"), "ScalingLimited").get("reason")
                         == "MetricsUnavailable", "the condition")
        await eventually(lambda: any(e["reason"] == "MetricsUnavailable" and e["type"] == "Warning"
                                     for e in posted_events(api)), "the Warning event")
    limited = condition(get(api, LLMD, "smol"), "ScalingLimited")
    assert limited["status"] == "True" and f"Prometheus at {url} cannot be read" in limited["message"]
    assert objects(api, DEPLOYMENTS) == before
    assert sum(e["reason"] == "MetricsUnavailable" for e in posted_events(api)) == 1
