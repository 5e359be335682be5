"""Tests of the Helm chart charts/spegel: lint, schema validation, and key renderings."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest

import crd_schemas
import render
import spegel_flags
from render import container, daemonset, find, find_all, is_hook

# The oldest Kubernetes the chart's defaults target, and the newest schemas available.
KUBE_VERSIONS = ["1.32.0", kubernetes_validate.utils.latest_version()]
VALUES_ALL = render.load_values_file(render.VALUES_ALL)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"] if workload["kind"] == "DaemonSet" else workload["spec"]


def env_of(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env") or []}


def by_name(items: list[dict]) -> dict:
    return {i["name"]: i for i in items}


# --------------------------------------------------------------------------------------------
# Lint and validation


@pytest.mark.parametrize("values", [None, VALUES_ALL], ids=["default", "all"])
def test_lint_is_clean(values):
    report = helm.lint(render.CHART_DIR, values, strict=True, namespace="spegel")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def validate_manifest(manifest: dict, kube_version: str = KUBE_VERSIONS[0]) -> str:
    """Validates one manifest; returns how ("builtin" or "crd")."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key in crd_schemas.SCHEMAS:
        jsonschema.validate(manifest, crd_schemas.SCHEMAS[key])
        return "crd"
    kubernetes_validate.validate(manifest, kube_version, strict=True)
    return "builtin"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("which", ["default", "all"])
def test_every_manifest_validates(which, kube_version, default_manifests, all_manifests):
    manifests = default_manifests if which == "default" else all_manifests
    assert manifests
    how = {}
    for m in manifests:
        try:
            how[(m["kind"], m["metadata"]["name"])] = validate_manifest(m, kube_version)
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"no schema for {m['apiVersion']} {m['kind']}: {e}")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{m['kind']}/{m['metadata']['name']} is invalid: {e.message} at {list(e.path)}")
    if which == "all":
        assert {k for k, v in how.items() if v == "crd"} == {
            ("ServiceMonitor", "spegel"),
            ("VerticalPodAutoscaler", "spegel"),
        }


def test_validation_catches_a_broken_manifest(default_manifests):
    """The validators used above do reject invalid manifests (builtin and CRD)."""
    ds = json.loads(json.dumps(daemonset(default_manifests)))
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(ds)
    ds = json.loads(json.dumps(daemonset(default_manifests)))
    ds["spec"]["template"]["spec"]["containers"][0]["bogusField"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(ds)
    sm = find(render.render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    sm["spec"]["endpoints"][0]["intervall"] = "1m"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(sm)


def test_grafana_operator_mode_validates():
    manifests = render.render(
        {"grafanaDashboard": {"enabled": True, "mode": "GrafanaOperator",
                              "grafanaOperator": {"matchLabels": {"dashboards": "grafana"}, "folder": "Infra"}}}
    )
    cr = find(manifests, "GrafanaDashboard")
    assert validate_manifest(cr) == "crd"
    assert cr["spec"]["instanceSelector"] == {"matchLabels": {"dashboards": "grafana"}}
    assert cr["spec"]["folder"] == "Infra"
    assert cr["spec"]["allowCrossNamespaceImport"] is True
    assert cr["spec"]["resyncPeriod"] == "10m"
    assert json.loads(cr["spec"]["json"]) == dashboard_json()
    assert find_all(manifests, "ConfigMap") == []


@pytest.mark.parametrize(
    "values, message",
    [
        ({"grafanaDashboard": {"enabled": True, "mode": "GrafanaOperator"}}, "matchLabels"),
        ({"grafanaDashboard": {"enabled": True, "mode": "Nope"}}, "Sidecar or GrafanaOperator"),
    ],
)
def test_grafana_dashboard_misconfiguration_fails(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render.render(values)


# --------------------------------------------------------------------------------------------
# Default rendering


def test_default_resources(default_manifests):
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in default_manifests)
    assert kinds == [
        ("DaemonSet", "spegel"),
        ("DaemonSet", "spegel-cleanup"),
        ("Pod", "spegel-cleanup-wait"),
        ("Service", "spegel"),
        ("Service", "spegel-bootstrap"),
        ("Service", "spegel-cleanup"),
        ("Service", "spegel-registry"),
        ("ServiceAccount", "spegel"),
    ]
    for m in default_manifests:
        assert m["metadata"]["namespace"] == "spegel"


def test_default_configuration_init_container(default_manifests):
    spec = pod_spec(daemonset(default_manifests))
    assert [c["name"] for c in spec["initContainers"]] == ["configuration"]
    init = container(spec, "configuration", init=True)
    assert init["image"] == "ghcr.io/spegel-rs/spegel:0.1.0"
    assert init["args"] == [
        "configuration",
        "--log-level=INFO",
        "--containerd-registry-config-path=/etc/containerd/certs.d",
        "--mirror-targets",
        "http://$(NODE_IP):30020",
        "--resolve-tags=true",
        "--prepend-existing=false",
    ]
    assert env_of(init)["NODE_IP"] == {
        "name": "NODE_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
    }
    assert init["volumeMounts"] == [{"name": "containerd-config", "mountPath": "/etc/containerd/certs.d"}]
    assert init["securityContext"] == {"readOnlyRootFilesystem": True}


def test_default_registry_container(default_manifests):
    spec = pod_spec(daemonset(default_manifests))
    assert [c["name"] for c in spec["containers"]] == ["registry"]
    reg = container(spec, "registry")
    assert reg["args"] == [
        "registry",
        "--log-level=INFO",
        "--mirror-resolve-retries=3",
        "--mirror-resolve-timeout=20ms",
        "--mirror-intent-wait=300ms",
        "--registry-addr=:5000",
        "--router-addr=:5001",
        "--metrics-addr=:9090",
        "--containerd-sock=/run/containerd/containerd.sock",
        "--containerd-namespace=k8s.io",
        "--containerd-content-path=/var/lib/containerd/io.containerd.content.v1.content",
        "--bootstrap-kind=dns",
        "--dns-bootstrap-domain=spegel-bootstrap.spegel.svc.cluster.local.",
        "--resolve-tags=true",
        "--debug-web-enabled=true",
        "--advertise-ttl=10m",
        "--ebpf=off",
        "--peer-selection=telemetry",
        "--mirror-race-timeout-floor=100ms",
        "--mirror-max-resumes=5",
        "--mirror-body-stall-timeout=30s",
        "--max-connections=1024",
        "--max-connections-per-ip=256",
        "--connection-first-byte-timeout=10s",
        "--min-transfer-rate=4096",
        "--data-dir=/var/lib/spegel",
    ]
    assert set(env_of(reg)) == {"NODE_IP"}
    assert env_of(reg)["NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert reg["ports"] == [
        {"name": "registry", "containerPort": 5000, "protocol": "TCP"},
        {"name": "router", "containerPort": 5001, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert all("hostPort" not in p for p in reg["ports"])
    assert reg["startupProbe"] == {
        "periodSeconds": 3,
        "failureThreshold": 60,
        "httpGet": {"path": "/readyz", "port": "registry"},
    }
    assert reg["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "registry"}}
    assert "livenessProbe" not in reg
    assert reg["resources"] == {"requests": {"memory": "128Mi"}, "limits": {"memory": "128Mi"}}
    assert reg["securityContext"] == {"readOnlyRootFilesystem": True}
    assert reg["volumeMounts"] == [
        {"name": "containerd-sock", "mountPath": "/run/containerd/containerd.sock"},
        {"name": "containerd-content", "mountPath": "/var/lib/containerd/io.containerd.content.v1.content",
         "readOnly": True},
        {"name": "data", "mountPath": "/var/lib/spegel"},
    ]


def test_default_pod_spec(default_manifests):
    ds = daemonset(default_manifests)
    spec = pod_spec(ds)
    assert by_name(spec["volumes"]) == {
        "containerd-sock": {"name": "containerd-sock",
                            "hostPath": {"path": "/run/containerd/containerd.sock", "type": "Socket"}},
        "containerd-content": {"name": "containerd-content",
                               "hostPath": {"path": "/var/lib/containerd/io.containerd.content.v1.content",
                                            "type": "Directory"}},
        "data": {"name": "data", "hostPath": {"path": "/var/lib/spegel", "type": "DirectoryOrCreate"}},
        "containerd-config": {"name": "containerd-config",
                              "hostPath": {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}},
    }
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["serviceAccountName"] == "spegel"
    assert spec["tolerations"] == [
        {"key": "CriticalAddonsOnly", "operator": "Exists"},
        {"effect": "NoExecute", "operator": "Exists"},
        {"effect": "NoSchedule", "operator": "Exists"},
    ]
    assert "hostNetwork" not in spec
    assert ds["spec"]["revisionHistoryLimit"] == 10
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/component": "spegel",
        "app.kubernetes.io/name": "spegel",
        "app.kubernetes.io/instance": "spegel",
    }
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_default_services(default_manifests):
    pod_labels = daemonset(default_manifests)["spec"]["template"]["metadata"]["labels"]
    metrics = find(default_manifests, "Service", "spegel")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert metrics["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics"

    registry = find(default_manifests, "Service", "spegel-registry")
    assert registry["spec"]["type"] == "NodePort"
    assert registry["spec"]["ports"] == [
        {"name": "registry", "port": 5000, "targetPort": "registry", "nodePort": 30020, "protocol": "TCP"}
    ]
    assert registry["spec"]["trafficDistribution"] == "PreferSameNode"
    assert "internalTrafficPolicy" not in registry["spec"]

    bootstrap = find(default_manifests, "Service", "spegel-bootstrap")
    assert bootstrap["spec"]["clusterIP"] == "None"
    assert bootstrap["spec"]["publishNotReadyAddresses"] is True
    assert all(p["protocol"] == "TCP" for p in bootstrap["spec"]["ports"])

    for svc in (metrics, registry, bootstrap):
        assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["metadata"]["name"]


def test_bootstrap_domain_names_the_bootstrap_service(default_manifests):
    reg = container(pod_spec(daemonset(default_manifests)), "registry")
    domain = next(a.split("=", 1)[1] for a in reg["args"] if a.startswith("--dns-bootstrap-domain="))
    svc = find(default_manifests, "Service", domain.split(".")[0])
    assert domain == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local."


def test_default_cleanup_hook(default_manifests):
    hooks = [m for m in default_manifests if is_hook(m)]
    assert sorted((m["kind"], m["metadata"]["name"]) for m in hooks) == [
        ("DaemonSet", "spegel-cleanup"),
        ("Pod", "spegel-cleanup-wait"),
        ("Service", "spegel-cleanup"),
    ]
    weights = {m["kind"]: m["metadata"]["annotations"]["helm.sh/hook-weight"] for m in hooks}
    assert weights == {"DaemonSet": "0", "Service": "0", "Pod": "1"}
    for m in hooks:
        ann = m["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "post-delete"
        assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation, hook-succeeded"

    cleanup_ds = find(default_manifests, "DaemonSet", "spegel-cleanup")
    spec = pod_spec(cleanup_ds)
    c = container(spec, "cleanup")
    assert c["args"] == [
        "cleanup",
        "--log-level=INFO",
        "--containerd-registry-config-path=/etc/containerd/certs.d",
        "--addr=:8080",
    ]
    assert c["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "readiness"}}
    assert c["ports"] == [{"name": "readiness", "containerPort": 8080, "protocol": "TCP"}]
    assert spec["volumes"] == [{"name": "containerd-config",
                                "hostPath": {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}}]
    # The release's ServiceAccount is already deleted when post-delete hooks run.
    assert "serviceAccountName" not in spec

    svc = find(default_manifests, "Service", "spegel-cleanup")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [{"name": "readiness", "port": 8080, "targetPort": "readiness", "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= cleanup_ds["spec"]["template"]["metadata"]["labels"].items()
    # The cleanup pods must not be selected by the main DaemonSet or its services.
    main_selector = daemonset(default_manifests)["spec"]["selector"]["matchLabels"]
    assert not main_selector.items() <= cleanup_ds["spec"]["template"]["metadata"]["labels"].items()

    wait = find(default_manifests, "Pod", "spegel-cleanup-wait")
    assert wait["spec"]["restartPolicy"] == "Never"
    assert container(wait["spec"], "cleanup-wait")["args"] == [
        "cleanup-wait",
        "--log-level=INFO",
        "--probe-endpoint=spegel-cleanup.spegel.svc.cluster.local.:8080",
    ]


# --------------------------------------------------------------------------------------------
# Everything on (values-all.yaml)


def test_all_mirror_targets_in_order(all_manifests):
    init = container(pod_spec(daemonset(all_manifests)), "configuration", init=True)
    args = init["args"]
    i = args.index("--mirror-targets")
    expected = (
        [f"http://$(NODE_IP):{VALUES_ALL['service']['registry']['nodePort']}"]
        + VALUES_ALL["spegel"]["additionalMirrorRegistries"]
        + VALUES_ALL["spegel"]["additionalMirrorTargets"]
    )
    assert args[i + 1 : i + 1 + len(expected)] == expected
    assert args[i + 1 + len(expected)].startswith("--")
    assert expected == [
        "http://$(NODE_IP):30120",
        "https://mirror-a.example.com",
        "https://mirror-b.example.com",
        "https://zot.example.com:5000",
    ]
    env = env_of(init)
    assert env["NODE_IP"] == {"name": "NODE_IP", "value": "10.1.2.3"}
    assert render.expand_env(args, {"NODE_IP": "10.1.2.3"})[i + 1] == "http://10.1.2.3:30120"


def test_all_configuration_args(all_manifests):
    spec = pod_spec(daemonset(all_manifests))
    assert [c["name"] for c in spec["initContainers"]] == ["prepare", "configuration"]
    init = container(spec, "configuration", init=True)
    assert init["image"] == (
        "registry.example.com/spegel-rs/spegel@sha256:0000000000000000000000000000000000000000000000000000000000000001"
    )
    assert init["imagePullPolicy"] == "Always"
    args = init["args"]
    assert args[:6] == [
        "configuration",
        "--log-level=DEBUG",
        "--containerd-registry-config-path=/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
        "--mirrored-registries",
        "https://docker.io",
        "https://ghcr.io",
    ]
    assert args[-2:] == ["--resolve-tags=false", "--prepend-existing=true"]
    assert {"name": "basic-auth", "mountPath": "/etc/secrets/basic-auth", "readOnly": True} in init["volumeMounts"]


def test_all_registry_container(all_manifests):
    spec = pod_spec(daemonset(all_manifests))
    reg = container(spec, "registry")
    assert reg["args"] == [
        "registry",
        "--log-level=DEBUG",
        "--mirror-resolve-retries=5",
        "--mirror-resolve-timeout=50ms",
        "--mirror-intent-wait=500ms",
        "--registry-addr=:5100",
        "--router-addr=:5101",
        "--metrics-addr=:9190",
        "--mirrored-registries",
        "https://docker.io",
        "https://ghcr.io",
        "--containerd-sock=/run/k3s/containerd/containerd.sock",
        "--containerd-namespace=k8s.io",
        "--containerd-content-path=/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content",
        "--bootstrap-kind=dns",
        "--dns-bootstrap-domain=spegel-bootstrap.spegel-system.svc.cluster.example.",
        "--registry-filters",
        "^docker\\.io/library/",
        "^ghcr\\.io/private/",
        ":latest$",
        "--resolve-tags=false",
        # visualize.enabled forces the debug UI on although debugWebEnabled is false.
        "--debug-web-enabled=true",
        "--visualize-enabled=true",
        "--advertise-ttl=15m",
        "--ebpf=on",
        "--peer-selection=latency",
        "--mirror-race-timeout-floor=250ms",
        "--mirror-max-resumes=2",
        "--mirror-body-stall-timeout=1m",
        "--max-connections=4096",
        "--max-connections-per-ip=64",
        "--connection-first-byte-timeout=5s",
        "--min-transfer-rate=0",
        "--data-dir=/data/spegel",
    ]
    assert [(p["name"], p["containerPort"], p["protocol"]) for p in reg["ports"]] == [
        ("registry", 5100, "TCP"),
        ("router", 5101, "TCP"),
        ("metrics", 9190, "TCP"),
    ]
    assert reg["livenessProbe"] == {"httpGet": {"path": "/livez", "port": "registry"}}
    assert reg["securityContext"] == {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"add": ["BPF", "NET_ADMIN"]},
    }
    assert container(spec, "configuration", init=True)["securityContext"] == VALUES_ALL["securityContext"]
    mounts = by_name(reg["volumeMounts"])
    assert mounts["basic-auth"] == {"name": "basic-auth", "mountPath": "/etc/secrets/basic-auth", "readOnly": True}
    assert mounts["containerd-sock"]["mountPath"] == "/run/k3s/containerd/containerd.sock"
    assert mounts["data"]["mountPath"] == "/data/spegel"
    volumes = by_name(spec["volumes"])
    assert volumes["data"]["hostPath"] == {"path": "/var/lib/spegel-rs", "type": "DirectoryOrCreate"}
    assert volumes["basic-auth"] == {"name": "basic-auth", "secret": {"secretName": "spegel-basic-auth"}}
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}}
    assert volumes["containerd-config"]["hostPath"]["path"] == "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["imagePullSecrets"] == [{"name": "pull-secret"}]
    assert spec["serviceAccountName"] == "spegel-sa"
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["affinity"] == VALUES_ALL["affinity"]
    assert spec["tolerations"] == VALUES_ALL["tolerations"]
    assert reg["resources"] == VALUES_ALL["resources"]


def test_all_metadata(all_manifests):
    for m in all_manifests:
        assert m["metadata"]["namespace"] == "spegel-system", m["metadata"]["name"]
        assert m["metadata"]["labels"]["team"] == "platform", m["metadata"]["name"]
    ds = daemonset(all_manifests)
    assert ds["metadata"]["annotations"] == {"example.com/daemonset": "yes"}
    assert ds["spec"]["template"]["metadata"]["annotations"] == {"example.com/pod": "yes"}
    assert ds["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    assert ds["spec"]["updateStrategy"] == VALUES_ALL["updateStrategy"]
    assert ds["spec"]["revisionHistoryLimit"] == 3
    sa = find(all_manifests, "ServiceAccount", "spegel-sa")
    assert sa["metadata"]["annotations"] == {"example.com/role": "mirror"}


def test_all_services(all_manifests):
    registry = find(all_manifests, "Service", "spegel-registry")
    assert registry["spec"]["internalTrafficPolicy"] == "Local"
    assert "trafficDistribution" not in registry["spec"]
    assert registry["spec"]["ports"][0]["nodePort"] == 30120
    assert registry["spec"]["ports"][0]["port"] == 5100
    assert registry["metadata"]["annotations"] == {"example.com/registry": "yes"}
    assert find(all_manifests, "Service", "spegel")["metadata"]["annotations"] == {"example.com/metrics": "yes"}
    assert find(all_manifests, "Service", "spegel-bootstrap")["metadata"]["annotations"] == {
        "example.com/bootstrap": "yes"
    }
    cleanup = find(all_manifests, "Service", "spegel-cleanup")
    assert cleanup["metadata"]["annotations"]["example.com/cleanup"] == "yes"
    assert cleanup["spec"]["ports"][0]["port"] == 8180
    wait = find(all_manifests, "Pod", "spegel-cleanup-wait")
    assert wait["spec"]["containers"][0]["args"][-1] == (
        "--probe-endpoint=spegel-cleanup.spegel-system.svc.cluster.example.:8180"
    )
    cleanup_ds = find(all_manifests, "DaemonSet", "spegel-cleanup")
    assert container(pod_spec(cleanup_ds), "cleanup")["args"][-1] == "--addr=:8180"


def test_all_service_monitor(all_manifests):
    sm = find(all_manifests, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        "scrapeTimeout": "10s",
        "relabelings": VALUES_ALL["serviceMonitor"]["relabelings"],
        "metricRelabelings": VALUES_ALL["serviceMonitor"]["metricRelabelings"],
    }]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["spegel-system"]}
    metrics_svc = find(all_manifests, "Service", "spegel")
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    for svc in find_all(all_manifests, "Service"):
        if svc is not metrics_svc:
            assert not sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_all_network_policy(all_manifests):
    np = find(all_manifests, "NetworkPolicy")
    pod_labels = daemonset(all_manifests)["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    router_rule, open_rule = np["spec"]["ingress"]
    assert router_rule["ports"] == [{"port": "router", "protocol": "TCP"}]
    assert router_rule["from"][0]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert open_rule == {"ports": [{"port": "registry", "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}]}
    # Port names used by the policy exist on the container.
    ports = {p["name"] for p in container(pod_spec(daemonset(all_manifests)), "registry")["ports"]}
    assert {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]} <= ports


def test_all_vertical_pod_autoscaler(all_manifests):
    vpa = find(all_manifests, "VerticalPodAutoscaler")
    assert vpa["spec"]["targetRef"] == {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "spegel"}
    assert vpa["spec"]["recommenders"] == [{"name": "custom-recommender"}]
    assert vpa["spec"]["resourcePolicy"]["containerPolicies"] == [{
        "containerName": "registry",
        "controlledValues": "RequestsOnly",
        "controlledResources": ["cpu", "memory"],
        "maxAllowed": {"cpu": "500m", "memory": "512Mi"},
        "minAllowed": {"cpu": "10m", "memory": "64Mi"},
    }]
    assert vpa["spec"]["updatePolicy"] == {"minReplicas": 1, "updateMode": "Recreate"}


def test_vpa_needs_the_api():
    manifests = render.render(values_files=[render.VALUES_ALL])
    assert find_all(manifests, "VerticalPodAutoscaler") == []


def dashboard_json() -> dict:
    with open(render.CHART_DIR / "monitoring" / "grafana-dashboard.json", encoding="utf-8") as f:
        return json.load(f)


def test_all_dashboard_configmap(all_manifests):
    cm = find(all_manifests, "ConfigMap", "spegel-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Spegel"}
    assert list(cm["data"]) == ["spegel.json"]
    assert json.loads(cm["data"]["spegel.json"]) == dashboard_json()


# --------------------------------------------------------------------------------------------
# Single options


def registry_args(values: dict) -> list[str]:
    return container(pod_spec(daemonset(render.render(values))), "registry")["args"]


def list_flag_values(args: list[str], flag: str) -> list[str] | None:
    if flag not in args:
        return None
    out = []
    for a in args[args.index(flag) + 1 :]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


@pytest.mark.parametrize(
    "spegel_values, expected",
    [
        ({}, None),
        ({"resolveLatestTag": False}, [":latest$"]),
        ({"registryFilters": ["^a/"]}, ["^a/"]),
        ({"registryFilters": ["^a/"], "resolveLatestTag": False}, ["^a/", ":latest$"]),
        ({"registryFilters": [":latest$"], "resolveLatestTag": False}, [":latest$"]),
    ],
)
def test_registry_filters(spegel_values, expected):
    assert list_flag_values(registry_args({"spegel": spegel_values}), "--registry-filters") == expected


@pytest.mark.parametrize(
    "spegel_values, expected",
    [
        ({}, "true"),
        ({"debugWebEnabled": False}, "false"),
        ({"debugWebEnabled": False, "visualize": {"enabled": True}}, "true"),
        ({"debugWebEnabled": True, "visualize": {"enabled": True}}, "true"),
    ],
)
def test_debug_web_enabled(spegel_values, expected):
    args = registry_args({"spegel": spegel_values})
    assert [a for a in args if a.startswith("--debug-web-enabled")] == [f"--debug-web-enabled={expected}"]
    visualize = spegel_values.get("visualize", {}).get("enabled", False)
    assert [a for a in args if a.startswith("--visualize")] == (["--visualize-enabled=true"] if visualize else [])


# --------------------------------------------------------------------------------------------
# eBPF telemetry


def registry_of(manifests: list[dict]) -> dict:
    return container(pod_spec(daemonset(manifests)), "registry")


def flag_value(args: list[str], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} given {len(values)} times in {args}"
    return values[0]


@pytest.mark.parametrize(
    "ebpf, mode",
    [({}, "off"), ({"enabled": False, "required": True}, "off"), ({"enabled": True}, "auto"),
     ({"enabled": True, "required": True}, "on")],
    ids=["default", "required-without-enabled", "enabled", "required"],
)
def test_ebpf_mode_flag(ebpf, mode):
    reg = registry_of(render.render({"ebpf": ebpf} if ebpf else None))
    assert flag_value(reg["args"], "--ebpf") == mode


def test_ebpf_off_adds_no_capabilities_or_mounts(default_manifests):
    spec = pod_spec(daemonset(default_manifests))
    reg = container(spec, "registry")
    assert "capabilities" not in reg["securityContext"]
    assert not any(m["mountPath"].startswith("/sys") for m in reg["volumeMounts"])
    assert not any("/sys" in (v.get("hostPath") or {}).get("path", "") for v in spec["volumes"])


def test_ebpf_on_adds_exactly_bpf_and_net_admin_to_the_registry_container():
    manifests = render.render({"ebpf": {"enabled": True}})
    spec = pod_spec(daemonset(manifests))
    reg = container(spec, "registry")
    assert reg["securityContext"] == {
        "readOnlyRootFilesystem": True,
        "capabilities": {"add": ["BPF", "NET_ADMIN"]},
    }
    # The container's own cgroup (its cgroup namespace root) is attached to through the
    # runtime's read-only /sys/fs/cgroup: no host cgroup mount, which would expose the node's.
    assert not any("/sys" in (v.get("hostPath") or {}).get("path", "") for v in spec["volumes"])
    init = container(spec, "configuration", init=True)
    assert init["securityContext"] == {"readOnlyRootFilesystem": True}
    hook_containers = [c for m in manifests if is_hook(m) and m["kind"] == "DaemonSet"
                       for c in pod_spec(m)["containers"]]
    assert hook_containers
    for c in hook_containers:
        assert "capabilities" not in (c.get("securityContext") or {})
    for kube_version in KUBE_VERSIONS:
        validate_manifest(daemonset(manifests), kube_version)


def test_ebpf_capabilities_merge_with_the_users():
    reg = registry_of(render.render({
        "ebpf": {"enabled": True},
        "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "CHOWN"]}},
    }))
    # Values merge with the chart's defaults; the user's order is kept and nothing doubled.
    assert reg["securityContext"] == {
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "CHOWN", "BPF"]},
    }


@pytest.mark.parametrize("selection", ["telemetry", "latency", "least-used"])
def test_peer_selection_flag(selection, cli):
    reg = registry_of(render.render({"spegel": {"peerSelection": selection}}))
    assert flag_value(reg["args"], "--peer-selection") == selection
    assert spegel_flags.check_args(cli, reg["args"]) == []


def test_ebpf_flags_are_known_to_the_binary(cli):
    flags = cli.subcommands["registry"]
    assert flags["ebpf"].enum_values == ["auto", "on", "off"]
    assert flags["peer-selection"].enum_values == ["telemetry", "latency", "least-used"]
    bad = registry_of(render.render({"spegel": {"peerSelection": "fastest"}}))["args"]
    assert spegel_flags.check_args(cli, bad) != []


def test_persistence_disabled():
    manifests = render.render({"spegel": {"persistence": {"enabled": False}}})
    spec = pod_spec(daemonset(manifests))
    assert not [a for a in container(spec, "registry")["args"] if a.startswith("--data-dir")]
    assert "data" not in by_name(spec["volumes"])
    assert "data" not in by_name(container(spec, "registry")["volumeMounts"])


def test_empty_content_path_reads_through_containerd():
    spec = pod_spec(daemonset(render.render({"spegel": {"containerdContentPath": ""}})))
    reg = container(spec, "registry")
    assert "--containerd-content-path=" in reg["args"]
    assert "containerd-content" not in by_name(spec["volumes"])
    assert "containerd-content" not in by_name(reg["volumeMounts"])


def test_mirror_add_disabled_drops_init_container_and_hooks():
    manifests = render.render({"spegel": {"containerdMirrorAdd": False}})
    spec = pod_spec(daemonset(manifests))
    assert "initContainers" not in spec
    assert "containerd-config" not in by_name(spec["volumes"])
    assert [m for m in manifests if is_hook(m)] == []


def test_resolve_tags_disabled():
    manifests = render.render({"spegel": {"resolveTags": False}})
    spec = pod_spec(daemonset(manifests))
    assert "--resolve-tags=false" in container(spec, "configuration", init=True)["args"]
    assert "--resolve-tags=false" in container(spec, "registry")["args"]


@pytest.mark.parametrize(
    "local, kube_version, expected",
    [
        (True, None, "internalTrafficPolicy"),
        (False, "v1.33.0", "trafficDistribution"),
        (False, "v1.32.4", "internalTrafficPolicy"),
        (True, "v1.34.0", "internalTrafficPolicy"),
    ],
)
def test_registry_traffic_stays_on_the_node(local, kube_version, expected):
    manifests = render.render({"service": {"registry": {"internalTrafficLocal": local}}},
                              kube_version=kube_version)
    spec = find(manifests, "Service", "spegel-registry")["spec"]
    assert {k: spec[k] for k in ("internalTrafficPolicy", "trafficDistribution") if k in spec} == {
        expected: "Local" if expected == "internalTrafficPolicy" else "PreferSameNode"
    }


def test_daemonset_args_expands_node_ip(default_manifests):
    args = render.daemonset_args(default_manifests, {"NODE_IP": "10.9.8.7"})
    assert set(args) == {"configuration", "registry"}
    i = args["configuration"].index("--mirror-targets")
    assert args["configuration"][i + 1] == "http://10.9.8.7:30020"


@pytest.mark.parametrize(
    "image, expected",
    [
        ({}, "ghcr.io/spegel-rs/spegel:0.1.0"),
        ({"tag": "v1.2.3"}, "ghcr.io/spegel-rs/spegel:v1.2.3"),
        ({"tag": "v1.2.3", "digest": "sha256:" + "a" * 64}, "ghcr.io/spegel-rs/spegel@sha256:" + "a" * 64),
    ],
)
def test_image_reference(image, expected):
    manifests = render.render({"image": image})
    images = {c["image"] for _, c in all_containers(manifests)}
    assert images == {expected}


def all_containers(manifests):
    for m in manifests:
        if m["kind"] in ("DaemonSet", "Pod"):
            spec = pod_spec(m)
            for c in (spec.get("initContainers") or []) + spec["containers"]:
                yield m, c


@pytest.mark.parametrize(
    "release, values, fullname",
    [
        ("spegel", {}, "spegel"),
        ("my-spegel", {}, "my-spegel"),
        ("mirror", {}, "mirror-spegel"),
        ("mirror", {"fullnameOverride": "p2p"}, "p2p"),
        ("mirror", {"nameOverride": "cache"}, "mirror-cache"),
    ],
)
def test_names(release, values, fullname):
    manifests = render.render(values, release=release, namespace="ns1")
    ds = daemonset(manifests)
    assert ds["metadata"]["name"] == fullname
    reg = container(pod_spec(ds), "registry")
    assert f"--dns-bootstrap-domain={fullname}-bootstrap.ns1.svc.cluster.local." in reg["args"]
    find(manifests, "Service", f"{fullname}-bootstrap")
    find(manifests, "Service", f"{fullname}-registry")
    wait = find(manifests, "Pod", f"{fullname}-cleanup-wait")
    assert wait["spec"]["containers"][0]["args"][-1] == f"--probe-endpoint={fullname}-cleanup.ns1.svc.cluster.local.:8080"
    find(manifests, "Service", f"{fullname}-cleanup")


# --------------------------------------------------------------------------------------------
# Flags are ones the binary accepts


@pytest.mark.parametrize("which", ["default", "all"])
def test_rendered_flags_are_accepted_by_the_binary(which, cli, default_manifests, all_manifests):
    manifests = default_manifests if which == "default" else all_manifests
    commands = render.spegel_commands(manifests)
    subcommands = sorted(args[0] for _, args in commands)
    assert subcommands == ["cleanup", "cleanup-wait", "configuration", "registry"]
    problems = {where: spegel_flags.check_args(cli, args) for where, args in commands}
    assert {k: v for k, v in problems.items() if v} == {}


def test_flag_checker_rejects_bad_args(cli):
    """check_args is strict enough to catch the mistakes a template could make."""
    assert spegel_flags.check_args(cli, ["registry", "--no-such-flag=1"]) == ["registry: unknown flag --no-such-flag"]
    assert spegel_flags.check_args(cli, ["registry", "--debug-web-enabled"])
    assert spegel_flags.check_args(cli, ["registry", "--debug-web-enabled=yes"])
    assert spegel_flags.check_args(cli, ["registry", "--mirror-resolve-timeout=20"])
    assert spegel_flags.check_args(cli, ["registry", "--bootstrap-kind=kubernetes"])
    assert spegel_flags.check_args(cli, ["registry", "--registry-addr=:5000", "stray"])
    assert spegel_flags.check_args(cli, ["registry", "--mirror-resolve-retries=three"])
    assert spegel_flags.check_args(cli, ["registry", "--log-level=LOUD"])
    assert spegel_flags.check_args(cli, ["configuration", "--resolve-tags=true"]) == [
        "configuration: required flag --mirror-targets missing"
    ]
    assert spegel_flags.check_args(cli, ["cleanup", "--addr=:1", "--addr=:2"])
    assert spegel_flags.check_args(cli, ["registry", "--advertise-ttl=10m", "--registry-filters", "a", "b"]) == []
    assert spegel_flags.check_args(cli, ["vizualize"]) == ["unknown subcommand 'vizualize'"]


def test_config_rs_parse_matches_known_flags(cli):
    """A sanity check of the config.rs parser on flags the original also has (§1.3–1.6)."""
    assert {"mirror-targets", "mirrored-registries", "resolve-tags", "prepend-existing",
            "containerd-registry-config-path", "log-level"} <= set(cli.subcommands["configuration"])
    assert cli.subcommands["configuration"]["mirror-targets"].required
    assert cli.subcommands["configuration"]["mirror-targets"].multiple
    assert cli.subcommands["registry"]["debug-web-enabled"].boolean
    assert cli.subcommands["registry"]["mirror-resolve-timeout"].duration
    assert cli.subcommands["registry"]["bootstrap-kind"].enum_values == ["dns", "http", "static"]
    assert {"addr", "containerd-registry-config-path"} <= set(cli.subcommands["cleanup"])
    assert {"probe-endpoint", "threshold", "period"} <= set(cli.subcommands["cleanup-wait"])


def spegel_binary() -> Path | None:
    candidates = [os.environ.get("SPEGEL_BIN")] if os.environ.get("SPEGEL_BIN") else []
    candidates += [str(spegel_flags.REPO_ROOT / "target" / p / "spegel") for p in ("release", "debug")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return Path(c)
    return None


def test_rendered_flags_match_built_binary_help(default_manifests, all_manifests):
    """Cross-checks against `spegel <subcommand> --help` when a binary has been built."""
    binary = spegel_binary()
    if binary is None:
        pytest.skip("no spegel binary (SPEGEL_BIN, target/release or target/debug); "
                    "test_rendered_flags_are_accepted_by_the_binary covers the flags from config.rs")
    for where, args in render.spegel_commands(default_manifests + all_manifests):
        out = subprocess.run([str(binary), args[0], "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        accepted = set(re.findall(r"^\s+(?:-\w, )?--([a-z0-9-]+)", out.stdout, re.M))
        used = {a[2:].split("=", 1)[0] for a in args[1:] if a.startswith("--")}
        assert used <= accepted, f"{where}: {binary} does not accept {sorted(used - accepted)}"


# --------------------------------------------------------------------------------------------
# Values compatibility with the original chart, dashboard, README


ORIGINAL_DEFAULTS = {
    # spegel-behaviour.md §7.1, except the image repository (this project's image).
    "image.repository": "ghcr.io/spegel-rs/spegel",
    "image.pullPolicy": "IfNotPresent",
    "image.tag": "",
    "image.digest": "",
    "imagePullSecrets": [],
    "nameOverride": "",
    "fullnameOverride": "",
    "namespaceOverride": "",
    "serviceAccount.annotations": {},
    "serviceAccount.name": "",
    "daemonsetAnnotations": {},
    "podAnnotations": {},
    "podSecurityContext": {},
    "revisionHistoryLimit": 10,
    "securityContext": {"readOnlyRootFilesystem": True},
    "service.registry.nodeIp": "",
    "service.registry.port": 5000,
    "service.registry.nodePort": 30020,
    "service.registry.annotations": {},
    "service.registry.internalTrafficLocal": False,
    "service.router.port": 5001,
    "service.metrics.port": 9090,
    "service.metrics.annotations": {},
    "service.bootstrap.annotations": {},
    "service.cleanup.port": 8080,
    "service.cleanup.annotations": {},
    "resources": {"requests": {"memory": "128Mi"}, "limits": {"memory": "128Mi"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "updateStrategy": {},
    "tolerations": [
        {"key": "CriticalAddonsOnly", "operator": "Exists"},
        {"effect": "NoExecute", "operator": "Exists"},
        {"effect": "NoSchedule", "operator": "Exists"},
    ],
    "affinity": {},
    "commonLabels": {},
    "clusterDomain": "cluster.local.",
    "serviceMonitor.enabled": False,
    "serviceMonitor.interval": "60s",
    "serviceMonitor.scrapeTimeout": "30s",
    "serviceMonitor.labels": {},
    "serviceMonitor.relabelings": [],
    "serviceMonitor.metricRelabelings": [],
    "grafanaDashboard.enabled": False,
    "grafanaDashboard.mode": "Sidecar",
    "grafanaDashboard.labels": {},
    "grafanaDashboard.annotations": {},
    "grafanaDashboard.grafanaOperator.allowCrossNamespaceImport": True,
    "grafanaDashboard.grafanaOperator.folder": "",
    "grafanaDashboard.grafanaOperator.resyncPeriod": "10m",
    "grafanaDashboard.grafanaOperator.matchLabels": {},
    "networkPolicy.enabled": False,
    "priorityClassName": "system-node-critical",
    "basicAuthSecretName": "",
    "spegel.logLevel": "INFO",
    "spegel.persistence.enabled": True,
    "spegel.persistence.path": "/var/lib/spegel",
    "spegel.persistence.hostPath": "/var/lib/spegel",
    "spegel.mirroredRegistries": [],
    "spegel.additionalMirrorTargets": [],
    "spegel.mirrorResolveRetries": 3,
    "spegel.mirrorResolveTimeout": "20ms",
    "spegel.containerdSock": "/run/containerd/containerd.sock",
    "spegel.containerdNamespace": "k8s.io",
    "spegel.containerdRegistryConfigPath": "/etc/containerd/certs.d",
    "spegel.containerdContentPath": "/var/lib/containerd/io.containerd.content.v1.content",
    "spegel.containerdMirrorAdd": True,
    "spegel.resolveTags": True,
    "spegel.registryFilters": [],
    "spegel.prependExisting": False,
    "spegel.debugWebEnabled": True,
    "verticalPodAutoscaler.enabled": False,
    "verticalPodAutoscaler.recommenders": [],
    "verticalPodAutoscaler.controlledResources": [],
    "verticalPodAutoscaler.controlledValues": "RequestsAndLimits",
    "verticalPodAutoscaler.maxAllowed": {},
    "verticalPodAutoscaler.minAllowed": {},
    "verticalPodAutoscaler.updatePolicy.minReplicas": 2,
    "verticalPodAutoscaler.updatePolicy.updateMode": "Auto",
    "livenessProbe.enabled": False,
    "extraVolumes": [],
    "extraInitContainers": [],
    # Documented by the original FAQ / history, added here.
    "spegel.resolveLatestTag": True,
    "spegel.additionalMirrorRegistries": [],
    "spegel.visualize.enabled": False,
    "spegel.advertiseTTL": "10m",
    # Kernel telemetry and peer choice (this project's additions).
    "spegel.peerSelection": "telemetry",
    # Mirror and connection limits (this project's flags, see the README's differences).
    "spegel.mirrorRaceTimeoutFloor": "100ms",
    "spegel.mirrorMaxResumes": 5,
    "spegel.mirrorBodyStallTimeout": "30s",
    "spegel.connections.max": 1024,
    "spegel.connections.maxPerIP": 256,
    "spegel.connections.firstByteTimeout": "10s",
    "spegel.connections.minTransferRate": 4096,
    # Coordination of simultaneous misses of a blob (this project's addition).
    "spegel.mirrorIntentWait": "300ms",
    "ebpf.enabled": False,
    "ebpf.required": False,
}


def lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"values.yaml has no {dotted}"
        node = node[part]
    return node


def leaf_keys(values: dict, prefix: str = "") -> list[str]:
    """Dotted keys of values.yaml; non-empty maps are descended, everything else is a leaf."""
    out = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("resources", "securityContext", "nodeSelector"):
            out += leaf_keys(v, key + ".")
        else:
            out.append(key)
    return out


def chart_values() -> dict:
    return render.load_values_file(render.CHART_DIR / "values.yaml")


@pytest.mark.parametrize("key", sorted(ORIGINAL_DEFAULTS))
def test_values_defaults_match_the_original(key):
    assert lookup(chart_values(), key) == ORIGINAL_DEFAULTS[key]


def test_values_have_no_undocumented_keys():
    assert set(leaf_keys(chart_values())) == set(ORIGINAL_DEFAULTS)


def test_readme_documents_every_value():
    readme = (render.CHART_DIR / "README.md").read_text(encoding="utf-8")
    table_keys = set(re.findall(r"^\|\s*`?([A-Za-z][\w.]*)`?\s*\|", readme, re.M))
    missing = set(leaf_keys(chart_values())) - table_keys
    assert missing == set(), f"README values table lacks {sorted(missing)}"
    for distro in ("k3s", "RKE2", "Talos", "EKS", "AKS", "kind"):
        assert distro in readme
    assert "discard_unpacked_layers = false" in readme
    assert "config_path" in readme


# The metrics the daemon exports (spegel-behaviour.md §5, spegel/src/metrics.rs).
DAEMON_METRICS = {
    "spegel_mirror_requests_total",
    "spegel_mirror_last_success_timestamp_seconds",
    "spegel_resolve_duration_seconds",
    "spegel_advertised_image_tags",
    "spegel_advertised_image_digests",
    "spegel_advertised_content_digests",
    "http_request_duration_seconds",
    "http_response_size_bytes",
    "http_requests_inflight",
}
HISTOGRAMS = {"spegel_resolve_duration_seconds", "http_request_duration_seconds", "http_response_size_bytes"}


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in re.findall(r"\b((?:spegel|http|container)_[a-z_]+)\b", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def test_dashboard_uses_only_exported_metrics():
    dash = dashboard_json()
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dash)))
    spegel_used = {m for m in used if not m.startswith("container_")}
    assert spegel_used == DAEMON_METRICS
    assert used - spegel_used <= {"container_memory_working_set_bytes", "container_cpu_usage_seconds_total"}
    for name in HISTOGRAMS:
        assert not any(re.search(rf"\b{name}\b(?!_)", e) for e in dashboard_exprs(dash)), (
            f"{name} is a histogram: use _bucket/_sum/_count"
        )


def test_dashboard_metrics_exist_in_daemon_source():
    source = (spegel_flags.REPO_ROOT / "spegel" / "src" / "metrics.rs").read_text(encoding="utf-8")
    declared = set(re.findall(r'"((?:spegel|http)_[a-z_]+)"', source))
    assert DAEMON_METRICS <= declared, f"metrics.rs lacks {sorted(DAEMON_METRICS - declared)}"


def test_dashboard_shape():
    dash = dashboard_json()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "pod", "registry"} <= variables
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var.startswith("__"), f"{panel['title']}: unknown ${var}"


def test_chart_metadata():
    with helm.Chart.load(render.CHART_DIR) as chart:
        meta = chart.metadata
    assert meta["name"] == "spegel"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"


def test_values_all_sets_every_key():
    """values-all.yaml must keep setting every chart value so that every branch renders."""
    all_keys = set(leaf_keys(VALUES_ALL))
    missing = {k for k in leaf_keys(chart_values())
               if k not in all_keys and not any(a.startswith(k + ".") for a in all_keys)}
    # Naming overrides are covered by test_names, the operator-mode keys by
    # test_grafana_operator_mode_validates (values-all uses the Sidecar mode).
    assert missing == {
        "nameOverride",
        "fullnameOverride",
        "grafanaDashboard.grafanaOperator.allowCrossNamespaceImport",
        "grafanaDashboard.grafanaOperator.folder",
        "grafanaDashboard.grafanaOperator.matchLabels",
        "grafanaDashboard.grafanaOperator.resyncPeriod",
    }
