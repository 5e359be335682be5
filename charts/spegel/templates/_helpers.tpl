{{/* Chart name, overridable with nameOverride. */}}
{{- define "spegel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: fullnameOverride, else the release name when it already contains the chart name,
else "<release>-<chart>"; truncated to 63 characters (DNS label limit).
*/}}
{{- define "spegel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Namespace of every resource. */}}
{{- define "spegel.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spegel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "spegel.labels" -}}
helm.sh/chart: {{ include "spegel.chart" . }}
{{ include "spegel.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select this release's pods; a component label is always added next to them. */}}
{{- define "spegel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spegel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spegel.serviceAccountName" -}}
{{- default (include "spegel.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* Image reference: the digest wins over the tag; the tag defaults to appVersion. */}}
{{- define "spegel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* NODE_IP environment variable: the configured IP or the node's host IP. */}}
{{- define "spegel.nodeIpEnv" -}}
- name: NODE_IP
{{- if .Values.service.registry.nodeIp }}
  value: {{ .Values.service.registry.nodeIp | quote }}
{{- else }}
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
{{- end }}

{{/*
Mirror targets written to hosts.toml, in order: the node-local Spegel through the registry
node port, then additionalMirrorRegistries, then additionalMirrorTargets.
*/}}
{{- define "spegel.mirrorTargets" -}}
{{- $targets := list (printf "http://$(NODE_IP):%v" .Values.service.registry.nodePort) }}
{{- range .Values.spegel.additionalMirrorRegistries }}
{{- $targets = append $targets . }}
{{- end }}
{{- range .Values.spegel.additionalMirrorTargets }}
{{- $targets = append $targets . }}
{{- end }}
{{- toJson $targets }}
{{- end }}

{{/* Registry filters: the configured ones, plus ":latest$" when latest tags must not be resolved. */}}
{{- define "spegel.registryFilters" -}}
{{- $filters := list }}
{{- range .Values.spegel.registryFilters }}
{{- $filters = append $filters . }}
{{- end }}
{{- if and (not .Values.spegel.resolveLatestTag) (not (has ":latest$" $filters)) }}
{{- $filters = append $filters ":latest$" }}
{{- end }}
{{- toJson $filters }}
{{- end }}

{{/* Whether the debug web UI is served: visualize.enabled forces it on. */}}
{{- define "spegel.debugWebEnabled" -}}
{{- if .Values.spegel.visualize.enabled }}true{{- else }}{{ .Values.spegel.debugWebEnabled }}{{- end }}
{{- end }}

{{/* DNS name of the headless bootstrap service. */}}
{{- define "spegel.bootstrapDomain" -}}
{{- printf "%s-bootstrap.%s.svc.%s" (include "spegel.fullname" .) (include "spegel.namespace" .) .Values.clusterDomain }}
{{- end }}

{{/* Annotations of the post-delete hook resources; weight is the argument's "weight". */}}
{{- define "spegel.hookAnnotations" -}}
helm.sh/hook: post-delete
helm.sh/hook-delete-policy: before-hook-creation, hook-succeeded
helm.sh/hook-weight: {{ .weight | quote }}
{{- end }}

{{/*
The --ebpf mode: off unless ebpf.enabled; on (fatal failure) when ebpf.required too.
*/}}
{{- define "spegel.ebpfMode" -}}
{{- if not .Values.ebpf.enabled -}}
off
{{- else if .Values.ebpf.required -}}
on
{{- else -}}
auto
{{- end -}}
{{- end }}

{{/*
The registry container's security context (JSON): securityContext, plus CAP_BPF and
CAP_NET_ADMIN when the eBPF probes are enabled (sock_ops programs need exactly these).
*/}}
{{- define "spegel.registrySecurityContext" -}}
{{- $sc := deepCopy (.Values.securityContext | default dict) -}}
{{- if .Values.ebpf.enabled -}}
{{- $caps := deepCopy ($sc.capabilities | default dict) -}}
{{- $add := concat ($caps.add | default list) (list "BPF" "NET_ADMIN") | uniq -}}
{{- $_ := set $caps "add" $add -}}
{{- $_ := set $sc "capabilities" $caps -}}
{{- end -}}
{{- toJson $sc -}}
{{- end }}
