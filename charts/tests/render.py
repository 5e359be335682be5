"""Render the Spegel Helm chart offline and return its manifests as Python dicts.

Uses helm-python-sdk (Helm v4 Go SDK through ctypes), so no `helm` binary and no cluster are
needed. Reused by other test suites, e.g. to run the DaemonSet's commands on a testbed:

    from render import render, daemonset
    manifests = render({"spegel": {"logLevel": "DEBUG"}})
    ds = daemonset(manifests)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

try:
    import yaml
except ImportError as e:  # pragma: no cover - exercised only when deps are missing
    raise ImportError(
        "PyYAML is missing: pip install -r charts/tests/requirements.txt"
    ) from e
try:
    import helm_python as helm
    from helm_python import _native as helm_native
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "helm-python-sdk is missing (module helm_python): "
        "pip install -r charts/tests/requirements.txt"
    ) from e

TESTS_DIR = Path(__file__).resolve().parent
CHART_DIR = TESTS_DIR.parent / "spegel"
VALUES_ALL = TESTS_DIR / "values-all.yaml"

DEFAULT_RELEASE = "spegel"
DEFAULT_NAMESPACE = "spegel"


def load_values_file(path: str | Path) -> dict[str, Any]:
    """Reads a values YAML file (like `helm -f`)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a values file must be a YAML mapping")
    return data


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges like Helm coalescing: maps merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_templates(
    values: dict[str, Any] | None = None,
    *,
    values_files: Iterable[str | Path] = (),
    release: str = DEFAULT_RELEASE,
    namespace: str = DEFAULT_NAMESPACE,
    api_versions: Iterable[str] = (),
    kube_version: str | None = None,
    chart_dir: str | Path = CHART_DIR,
) -> dict[str, list[dict[str, Any]]]:
    """Renders the chart; returns template path -> the non-empty YAML documents it produced.

    `values_files` are merged in order, then `values` on top. `api_versions` adds API groups
    to `.Capabilities.APIVersions` (e.g. "autoscaling.k8s.io/v1" for the VPA template).
    Raises helm_python.HelmRenderError when a template fails (e.g. a `fail` call).
    """
    merged: dict[str, Any] = {}
    for path in values_files:
        merged = merge_values(merged, load_values_file(path))
    if values:
        merged = merge_values(merged, values)

    opts: dict[str, Any] = {"name": release, "namespace": namespace}
    api_versions = list(api_versions)
    if api_versions:
        opts["api_versions"] = api_versions
    if kube_version is not None:
        opts["kube_version"] = kube_version

    with helm.Chart.load(chart_dir) as chart:
        # Chart.render() does not expose api_versions/kube_version; the C ABI it wraps
        # accepts them in the same options object.
        raw = helm_native.call_string(
            "helm_render", chart._raw(), json.dumps(merged), json.dumps(opts)
        )
    rendered: dict[str, str] = json.loads(raw)

    out: dict[str, list[dict[str, Any]]] = {}
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        for d in docs:
            if not isinstance(d, dict) or "kind" not in d:
                raise ValueError(f"{template} rendered a document that is not a manifest: {d!r}")
        if docs:
            out[template] = docs
    return out


def render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Renders the chart and returns every manifest (hooks included) as a list of dicts.

    Accepts the keyword arguments of `render_templates`.
    """
    return [d for docs in render_templates(values, **kwargs).values() for d in docs]


def render_all(**kwargs: Any) -> list[dict[str, Any]]:
    """Renders with `values-all.yaml` (every option on) and the VPA API available."""
    kwargs.setdefault("values_files", [VALUES_ALL])
    kwargs.setdefault("api_versions", ["autoscaling.k8s.io/v1"])
    return render(**kwargs)


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """Returns the single manifest of `kind` (and `name`, if given); fails if not exactly one."""
    hits = [
        m
        for m in manifests
        if m.get("kind") == kind and (name is None or m["metadata"]["name"] == name)
    ]
    if len(hits) != 1:
        names = [(m.get("kind"), m["metadata"].get("name")) for m in manifests]
        raise LookupError(f"expected one {kind} {name or ''}, found {len(hits)} among {names}")
    return hits[0]


def find_all(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Returns every manifest of `kind`."""
    return [m for m in manifests if m.get("kind") == kind]


def is_hook(manifest: dict[str, Any]) -> bool:
    """Whether the manifest is a Helm hook (not part of the installed release)."""
    return "helm.sh/hook" in (manifest["metadata"].get("annotations") or {})


def daemonset(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The main Spegel DaemonSet (not the post-delete cleanup one)."""
    hits = [m for m in find_all(manifests, "DaemonSet") if not is_hook(m)]
    if len(hits) != 1:
        raise LookupError(f"expected one non-hook DaemonSet, found {len(hits)}")
    return hits[0]


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    """The container (or init container) called `name` of a pod spec."""
    key = "initContainers" if init else "containers"
    for c in pod_spec.get(key) or []:
        if c["name"] == name:
            return c
    raise LookupError(f"no {key[:-1]} named {name!r}")


def expand_env(args: list[str], env: dict[str, str]) -> list[str]:
    """Expands `$(VAR)` in container args the way the kubelet does (unknown ones stay as is)."""
    out = []
    for arg in args:
        for key, value in env.items():
            arg = arg.replace(f"$({key})", value)
        out.append(arg)
    return out


def daemonset_args(manifests: list[dict[str, Any]], env: dict[str, str]) -> dict[str, list[str]]:
    """Args of the main DaemonSet's Spegel containers by name ("configuration", "registry"),
    with `$(VAR)` expanded from `env` (e.g. {"NODE_IP": "10.0.0.1"})."""
    spec = daemonset(manifests)["spec"]["template"]["spec"]
    out = {}
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        if image_repository(c["image"]).endswith("/spegel") and "args" in c:
            out[c["name"]] = expand_env(c["args"], env)
    return out


def image_repository(image: str) -> str:
    """An image reference without its tag and digest."""
    repo = image.split("@", 1)[0]
    head, _, last = repo.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def spegel_commands(manifests: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Every container running the Spegel image: (manifest kind/name/container, args)."""
    out = []
    for m in manifests:
        if m["kind"] == "Pod":
            spec = m["spec"]
        elif m["kind"] == "DaemonSet":
            spec = m["spec"]["template"]["spec"]
        else:
            continue
        for key in ("initContainers", "containers"):
            for c in spec.get(key) or []:
                if image_repository(c["image"]).endswith("/spegel") and "args" in c:
                    out.append((f"{m['kind']}/{m['metadata']['name']}/{c['name']}", c["args"]))
    return out
