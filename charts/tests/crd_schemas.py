"""Basic-shape JSON schemas for the custom resources the chart can render.

kubernetes-validate only ships schemas of built-in kinds. These cover the fields the chart
writes, as the upstream CRDs define them (Prometheus Operator ServiceMonitor, Kubernetes
autoscaler VerticalPodAutoscaler, Grafana Operator GrafanaDashboard), and reject unknown
fields so a typo in a template fails.
"""

from __future__ import annotations

from typing import Any

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY_MAP = {"type": "object", "additionalProperties": QUANTITY}

METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
        "namespace": {"type": "string", "pattern": DNS_SUBDOMAIN},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


RELABEL = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                "dropequal", "DropEqual",
            ]
        },
    },
    "additionalProperties": False,
}

SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector"],
        "properties": {
            "endpoints": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        "relabelings": {"type": "array", "items": RELABEL},
                        "metricRelabelings": {"type": "array", "items": RELABEL},
                    },
                    "additionalProperties": False,
                },
            },
            "namespaceSelector": {
                "type": "object",
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
                "additionalProperties": False,
            },
            "selector": {
                "type": "object",
                "properties": {"matchLabels": STRING_MAP},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
)

VERTICAL_POD_AUTOSCALER = _resource(
    "autoscaling.k8s.io/v1",
    "VerticalPodAutoscaler",
    {
        "type": "object",
        "required": ["targetRef"],
        "properties": {
            "targetRef": {
                "type": "object",
                "required": ["kind", "name"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "recommenders": {
                "type": "array",
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "resourcePolicy": {
                "type": "object",
                "properties": {
                    "containerPolicies": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "containerName": {"type": "string"},
                                "mode": {"enum": ["Auto", "Off"]},
                                "controlledResources": {
                                    "type": "array",
                                    "items": {"enum": ["cpu", "memory"]},
                                },
                                "controlledValues": {"enum": ["RequestsAndLimits", "RequestsOnly"]},
                                "maxAllowed": QUANTITY_MAP,
                                "minAllowed": QUANTITY_MAP,
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
            "updatePolicy": {
                "type": "object",
                "properties": {
                    "minReplicas": {"type": "integer", "minimum": 1},
                    "updateMode": {"enum": ["Off", "Initial", "Recreate", "Auto", "InPlaceOrRecreate"]},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
)

GRAFANA_DASHBOARD = _resource(
    "grafana.integreatly.org/v1beta1",
    "GrafanaDashboard",
    {
        "type": "object",
        "required": ["instanceSelector"],
        "properties": {
            "allowCrossNamespaceImport": {"type": "boolean"},
            "folder": {"type": "string"},
            "resyncPeriod": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"},
            "instanceSelector": {
                "type": "object",
                "required": ["matchLabels"],
                "properties": {"matchLabels": {**STRING_MAP, "minProperties": 1}},
                "additionalProperties": False,
            },
            "json": {"type": "string", "minLength": 2},
        },
        "additionalProperties": False,
    },
)

# (apiVersion, kind) -> schema.
SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("autoscaling.k8s.io/v1", "VerticalPodAutoscaler"): VERTICAL_POD_AUTOSCALER,
    ("grafana.integreatly.org/v1beta1", "GrafanaDashboard"): GRAFANA_DASHBOARD,
}
