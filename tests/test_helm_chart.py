"""charts/cleave rendered with the real Helm (infra/scripts/helm.sh, `make install-test`):
lint and template for the default, ci/ and kind values; every rendered object loaded
strictly into the `kubernetes` client's models (required fields, and no key the API
does not know); pod security, resources, scrape annotations, RBAC, dashboards; and
values.schema.json rejecting bad values. No API server runs here, so nothing is applied.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "cleave"
CRD = CHART / "crds" / "llmdeployments.cleave.dev.yaml"
KIND_VALUES = ROOT / "infra" / "kind" / "values.yaml"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
VALUE_SETS = {"default": None, "kind": KIND_VALUES} | {f"ci/{p.name}": p for p in CI_VALUES}

# Kinds this chart may render, by (apiVersion, kind), and the client model of each.
MODELS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}
# Custom resources: the client has no model. LLMDeployment is checked against its CRD's schema.
CUSTOM = {("cleave.dev/v1alpha1", "LLMDeployment"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
          ("monitoring.coreos.com/v1", "PrometheusRule")}


def helm() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("helm is missing: run make install-test (infra/scripts/helm.sh install)")


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


@functools.cache
def render(values: Path | None = None, *sets: str) -> tuple[dict, ...]:
    args = ["template", "cleave", str(CHART), "--namespace", "serving"]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def pod_specs(objects) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]) for o in objects if o["kind"] == "Deployment"]


# -- strict model check -----------------------------------------------------------------

PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def check_strict(value, type_name: str, path: str) -> list[str]:
    """Problems of ``value`` read as the client type ``type_name``: unknown keys (which
    the client's deserializer silently drops) and wrong primitive types."""
    if value is None:
        return []
    if match := re.fullmatch(r"(?:List|list)\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, item in enumerate(value) for p in check_strict(item, match.group(1), f"{path}[{i}]")]
    if match := re.fullmatch(r"(?:Dict\[\w+, (.+)\]|dict\(\w+, (.+)\))", type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = match.group(1) or match.group(2)
        return [p for k, v in value.items() for p in check_strict(v, inner, f"{path}.{k}")]
    if type_name == "object":  # IntOrString, raw extensions
        return []
    if type_name in PRIMITIVES:
        wanted = PRIMITIVES[type_name]
        if isinstance(value, bool) and type_name != "bool" or not isinstance(value, wanted):
            return [f"{path}: expected {type_name}, got {value!r}"]
        return []
    if type_name in ("datetime", "date", "bytes"):
        return []
    model = getattr(client.models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    problems = [f"{path}.{key}: unknown field of {type_name}" for key in value if key not in by_key]
    for key, item in value.items():
        if key in by_key:
            problems += check_strict(item, model.openapi_types[by_key[key]], f"{path}.{key}")
    return problems


def validate_object(obj: dict) -> None:
    key = (obj.get("apiVersion"), obj.get("kind"))
    name = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
    if key in CUSTOM:
        return
    assert key in MODELS, f"{name}: no client model mapped for {key}"
    model = MODELS[key]
    problems = check_strict(obj, model, name)
    assert not problems, "\n".join(problems)
    # The client's own deserializer checks required fields and enums.
    client.ApiClient()._ApiClient__deserialize(obj, model)


# -- lint and render --------------------------------------------------------------------


@pytest.mark.parametrize("label", VALUE_SETS)
def test_helm_lint(label):
    args = ["lint", str(CHART), "--strict"]
    if VALUE_SETS[label] is not None:
        args += ["-f", str(VALUE_SETS[label])]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("label", VALUE_SETS)
def test_every_object_matches_the_kubernetes_models(label):
    objects = render(VALUE_SETS[label])
    assert objects
    for obj in objects:
        validate_object(obj)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"


def test_the_strict_check_catches_what_the_client_drops():
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {}, "template": {"spec": {"containers": [
                      {"name": "c", "image": "i", "securityContxt": {}}]}}}}
    with pytest.raises(AssertionError, match="securityContxt: unknown field"):
        validate_object(deployment)
    del deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"]
    del deployment["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        validate_object(deployment)


def test_default_renders_operator_and_llmdeployment_and_static_renders_roles():
    default = render(None)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in default}
    assert ("Deployment", "cleave-operator") in kinds
    assert ("LLMDeployment", "cleave") in kinds
    assert not any(o["kind"] == "Deployment" and o["metadata"].get("labels", {}).get("cleave.dev/role") for o in default)
    static = render(CHART / "ci" / "static-values.yaml")
    roles = {o["metadata"]["labels"]["cleave.dev/role"] for o in static
             if o["kind"] == "Deployment" and "cleave.dev/role" in o["metadata"]["labels"]}
    assert roles == {"router", "prefill", "decode", "kvstore", "expert"}
    assert not any(o["kind"] == "LLMDeployment" for o in static)


@pytest.mark.skipif(not CRD.exists(), reason="the LLMDeployment CRD is not in the chart yet")
@pytest.mark.parametrize("label", VALUE_SETS)
def test_llmdeployment_matches_its_crd_schema(label):
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = version["schema"]["openAPIV3Schema"]
    for obj in render(VALUE_SETS[label]):
        if obj["kind"] == "LLMDeployment":
            assert obj["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
            jsonschema.validate(obj, schema)


def test_llmdeployment_carries_the_values():
    (ld,) = [o for o in render(CHART / "ci" / "operator-namespaced-values.yaml") if o["kind"] == "LLMDeployment"]
    spec = ld["spec"]
    assert ld["metadata"]["name"] == "smollm2"
    assert spec["model"] == {"name": "smollm2-135m-instruct", "path": "/opt/cleave/models/smollm2-135m-instruct"}
    assert set(spec["roles"]) == {"router", "prefill", "decode", "kvstore"}
    assert spec["targets"]["ttft"] == {"percentile": 95, "seconds": 1.5}
    assert spec["connections"] == {"redisUrl": "redis://cleave-redis:6379/0", "eventsBootstrap": "cleave-broker:9092"}
    assert spec["autoscaling"]["policy"]["enabled"] is True


# -- security ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", VALUE_SETS)
def test_every_pod_is_non_root_read_only_and_bounded(label):
    pods = pod_specs(render(VALUE_SETS[label]))
    assert pods
    for name, template in pods:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        mounts_needed = set()
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc.get("privileged"), name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: /tmp must be a writable emptyDir"
            mounts_needed |= {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts_needed <= {v["name"] for v in spec.get("volumes", [])}, name


@pytest.mark.parametrize("label", VALUE_SETS)
def test_operator_rbac_is_what_it_needs_and_no_more(label):
    objects = render(VALUE_SETS[label])
    rules = [r for o in objects if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]
    if not any(o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator") for o in objects):
        assert not rules
        return
    granted = {(group, resource): set(r["verbs"]) for r in rules
               for group in r["apiGroups"] for resource in r["resources"]}
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    assert {"get", "list", "watch", "patch"} <= granted[("cleave.dev", "llmdeployments")]
    assert "patch" in granted[("cleave.dev", "llmdeployments/status")]
    for resource in (("apps", "deployments"), ("", "services"), ("", "configmaps")):
        assert {"get", "list", "watch", "create", "patch", "delete"} <= granted[resource], resource
    assert "create" in granted[("", "events")]
    assert ("", "secrets") not in granted and ("", "pods") not in granted


# -- observability ----------------------------------------------------------------------


def test_metrics_pods_carry_prometheus_annotations():
    objects = render(CHART / "ci" / "static-values.yaml")
    workers = [(n, t) for n, t in pod_specs(objects) if "cleave.dev/role" in t["metadata"]["labels"]]
    assert len(workers) == 5
    for name, template in workers:
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == "/metrics", name
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert int(annotations["prometheus.io/port"]) in ports, name
    off = render(CHART / "ci" / "static-values.yaml", "metrics.podAnnotations=false")
    assert all("prometheus.io/scrape" not in (t["metadata"].get("annotations") or {}) for _, t in pod_specs(off))


def test_role_config_becomes_cleave_environment():
    objects = render(CHART / "ci" / "static-values.yaml")
    (decode,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "cleave-decode"]
    env = {e["name"]: e.get("value") for e in decode["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CLEAVE_MAX_NUM_SEQS"] == "32"
    assert env["CLEAVE_EXPERT_BACKEND"] == "remote"
    assert env["CLEAVE_PORT"] == "50080" and env["CLEAVE_METRICS_PORT"] == "9480"
    assert env["CLEAVE_REDIS_URL"] == "redis://redis.data.svc:6379/0"
    assert "CLEAVE_STREAM_PORT" not in env
    # Expert replicas serve RunExperts on a fixed stream port too, declared like gRPC's.
    (expert,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "cleave-expert"]
    container = expert["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["CLEAVE_STREAM_PORT"] == "50091"
    assert {"name": "stream", "containerPort": 50091} in container["ports"]


def test_dashboards_ship_as_valid_json_configmaps():
    shipped = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    maps = [o for o in render(None) if o["kind"] == "ConfigMap"
            and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    found = {name: json.loads(text) for cm in maps for name, text in cm["data"].items()}
    assert found == shipped and shipped


def test_prometheus_rule_is_the_infra_alert_rules():
    objects = render(CHART / "ci" / "static-values.yaml")
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    infra = yaml.safe_load((ROOT / "infra" / "prometheus" / "rules" / "cleave.yml").read_text())
    assert rule["spec"] == infra and rule["spec"]["groups"]
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "http"}


def test_network_policies_cover_every_pod():
    objects = render(CHART / "ci" / "static-values.yaml", "redis.enabled=true", "broker.enabled=true",
                     "operator.enabled=true")
    policies = [o["spec"]["podSelector"] for o in objects if o["kind"] == "NetworkPolicy"]

    def selected(labels: dict, selector: dict) -> bool:
        if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
            return False
        return all(e["operator"] == "In" and labels.get(e["key"]) in e["values"]
                   or e["operator"] == "Exists" and e["key"] in labels
                   for e in selector.get("matchExpressions") or [])

    for name, template in pod_specs(objects):
        assert any(selected(template["metadata"]["labels"], s) for s in policies), name


# -- values.schema.json -----------------------------------------------------------------

BAD_VALUES = [
    ("workloads=bogus", "workloads"),
    ("router.replicas=-1", "replicas"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("notAValue=1", "notAValue"),
    ("redis.enabled=false", "redis"),
    ("model.path=models/relative", "path"),
    ("decode.config.max_num_seqs=8", "config"),
    ("llmDeployment.targets.ttft.percentile=20", "percentile"),
    ("operator.watchNamespaces[0]=Bad_Name", "watchNamespaces"),
    ("metrics.serviceMonitor.interval=often", "interval"),
    ("operator.prometheusUrl=prometheus:9090", "prometheusUrl"),
]


@pytest.mark.parametrize("setting,mentions", BAD_VALUES)
def test_schema_rejects_bad_values(setting, mentions):
    result = run_helm("template", "cleave", str(CHART), "--set", setting)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "schema" in result.stderr and mentions in result.stderr, result.stderr


# -- images and kind --------------------------------------------------------------------


def test_kind_make_targets_reference_files_that_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("kind-up", "kind-load", "kind-install", "kind-smoke", "kind-down"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    for path in ("infra/kind/cluster.yaml", "infra/kind/values.yaml", "infra/docker/Dockerfile", "charts/cleave"):
        assert path in makefile and (ROOT / path).exists(), path
    assert (ROOT / ".dockerignore").exists()
    cluster = yaml.safe_load((ROOT / "infra" / "kind" / "cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"


def test_dockerfile_pins_what_the_project_pins_and_runs_non_root():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert torch_pin in dockerfile
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert 'ENTRYPOINT ["cleave"]' in dockerfile
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["model"]["path"] in dockerfile


def render_notes(tmp_path: Path, values: Path | None = None, *sets: str) -> str:
    # `helm template` skips NOTES.txt and `helm install --dry-run` needs a cluster: render
    # a copy of the chart in which NOTES.txt is a named template, printed into a YAML string.
    chart = tmp_path / "cleave"
    shutil.copytree(CHART, chart)
    notes_source = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}' + notes_source + "{{- end -}}")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "notes" . | toJson }}\n')
    args = ["template", "cleave", str(chart), "--show-only", "templates/notes.yaml"]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


@pytest.mark.parametrize("label", VALUE_SETS)
def test_notes_tell_the_user_what_to_do_next(label, tmp_path):
    notes = render_notes(tmp_path, VALUE_SETS[label])
    values = yaml.safe_load(VALUE_SETS[label].read_text()) if VALUE_SETS[label] else {}
    model = (values.get("model") or {}).get("name", "smollm2-135m-instruct")
    assert "port-forward svc/" in notes and "/v1/completions" in notes and f'"model": "{model}"' in notes
    routers = {o["metadata"]["name"] for o in render(VALUE_SETS[label]) if o["kind"] == "Service"
               and o["metadata"]["name"].endswith("-router")}
    lds = [o for o in render(VALUE_SETS[label]) if o["kind"] == "LLMDeployment"]
    routers |= {f"{o['metadata']['name']}-router" for o in lds}  # the operator names it <name>-router
    (router,) = re.findall(r"port-forward svc/(\S+)", notes)
    assert router in routers


def operator_env(objects) -> dict[str, str]:
    (operator,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator")]
    return {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_operator_gets_the_prometheus_url_and_notes_warn_without_it(tmp_path):
    assert "CLEAVE_PROMETHEUS_URL" not in operator_env(render())
    url = "http://prometheus-operated.monitoring:9090"
    assert operator_env(render(None, f"operator.prometheusUrl={url}"))["CLEAVE_PROMETHEUS_URL"] == url
    autoscaling = "llmDeployment.autoscaling.policy.enabled=true"
    assert "operator.prometheusUrl is empty" in render_notes(tmp_path / "no-url", None, autoscaling)
    assert "operator.prometheusUrl" not in render_notes(tmp_path / "url", None, autoscaling,
                                                        f"operator.prometheusUrl={url}")
    assert "operator.prometheusUrl" not in render_notes(tmp_path / "off")
