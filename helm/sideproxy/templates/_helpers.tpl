{{/*
Names, labels and the pieces every workload shares. Kubernetes names that end up in DNS labels
(Services, pods' generateName) are at most 63 characters, so every name is truncated to fit
*with* its suffix, and never ends in a dash.
*/}}

{{/* The chart's name, for app.kubernetes.io/name. */}}
{{- define "sideproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: the release name (so `helm install llm` gives `llm-proxy` and
`llm-operator`), or fullnameOverride. Truncated so that "<prefix>-operator" fits in 63.
*/}}
{{- define "sideproxy.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- end }}

{{- define "sideproxy.operator.fullname" -}}
{{- printf "%s-operator" (include "sideproxy.fullname" .) }}
{{- end }}

{{- define "sideproxy.proxy.fullname" -}}
{{- printf "%s-proxy" (include "sideproxy.fullname" .) }}
{{- end }}

{{/* name-version, for the helm.sh/chart label. */}}
{{- define "sideproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "sideproxy.labels" -}}
helm.sh/chart: {{ include "sideproxy.chart" . }}
app.kubernetes.io/name: {{ include "sideproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sideproxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Immutable selector labels of one component: call with (dict "ctx" $ "component" "proxy"). */}}
{{- define "sideproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sideproxy.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: (dict "ctx" $ "component" "proxy"). */}}
{{- define "sideproxy.componentLabels" -}}
{{ include "sideproxy.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image reference; the tag defaults to the chart's appVersion, a digest wins over both. */}}
{{- define "sideproxy.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* ServiceAccount names (an existing one when create is false and a name is given). */}}
{{- define "sideproxy.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "sideproxy.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sideproxy.proxy.serviceAccountName" -}}
{{- if .Values.proxy.serviceAccount.create }}
{{- default (include "sideproxy.proxy.fullname" .) .Values.proxy.serviceAccount.name }}
{{- else }}
{{- required "proxy.serviceAccount.name is required when proxy.serviceAccount.create is false" .Values.proxy.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The CreditPool this release's proxy serves, and the two objects the operator writes for it. */}}
{{/* The pool: proxy.pool, else the release name. */}}
{{- define "sideproxy.pool" -}}
{{- $pool := default .Release.Name .Values.proxy.pool }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $pool) }}
{{- fail (printf "proxy.pool %q is not a valid CreditPool name (lowercase DNS subdomain)" $pool) }}
{{- end }}
{{- if gt (len $pool) 245 }}
{{- fail (printf "proxy.pool %q is too long: %q must fit in 253 characters" $pool (printf "%s-routing" $pool)) }}
{{- end }}
{{- $pool }}
{{- end }}

{{- define "sideproxy.routingConfigMap" -}}
{{- printf "%s-routing" (include "sideproxy.pool" .) }}
{{- end }}

{{- define "sideproxy.keySecret" -}}
{{- printf "%s-keys" (include "sideproxy.pool" .) }}
{{- end }}

{{/*
Pod- and container-level security contexts: Pod Security "restricted" by default. Setting a
field to null in your values (e.g. runAsUser: null on OpenShift, which assigns UIDs itself)
removes it, as Helm drops null values when it merges them.
*/}}
{{- define "sideproxy.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "sideproxy.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* The namespaces the operator serves: [] means cluster-wide. */}}
{{- define "sideproxy.operator.clusterWide" -}}
{{- if empty .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
What the operator does in each namespace it serves (see sideproxy/operator/__init__.py, which
lists every call it makes). Namespaced mode renders these rules as a Role per watched namespace;
cluster-wide mode (operator.watchNamespaces empty) as one ClusterRole.
*/}}
{{- define "sideproxy.operator.rules" -}}
# Its own resources: kopf lists and watches them, patches its finalizers/annotations on them...
- apiGroups: ["sideproxy.dev"]
  resources: ["creditpools", "poolkeys"]
  verbs: ["get", "list", "watch", "patch"]
# ...and the operator writes their status (phase, cool-downs, counters, conditions).
- apiGroups: ["sideproxy.dev"]
  resources: ["creditpools/status", "poolkeys/status"]
  verbs: ["get", "patch", "update"]
# The routing ConfigMap and key Secret it writes for each pool; it reads the key Secrets that
# PoolKeys and clientAuth name.
- apiGroups: [""]
  resources: ["configmaps", "secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# The proxies' 429/401 reports arrive as core Events (list/watch); kopf and the operator post and
# update their own.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* NetworkPolicy egress rules both components need: DNS and the API server. */}}
{{- define "sideproxy.egress.dnsAndApi" -}}
# Cluster DNS.
- to:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 8 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
# The Kubernetes API server (its endpoints' addresses when networkPolicy.apiServer.cidrs is set).
- {{- with .Values.networkPolicy.apiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
  ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end }}
