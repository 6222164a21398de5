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

{{/* Labels on every object: the app.kubernetes.io set, then commonLabels (which cannot
override them). */}}
{{- define "sideproxy.labels" -}}
{{- $labels := dict
  "helm.sh/chart" (include "sideproxy.chart" .)
  "app.kubernetes.io/name" (include "sideproxy.name" .)
  "app.kubernetes.io/instance" (.Release.Name | trunc 63 | trimSuffix "-")
  "app.kubernetes.io/version" (.Chart.AppVersion | trunc 63 | trimSuffix "-")
  "app.kubernetes.io/managed-by" .Release.Service
  "app.kubernetes.io/part-of" "sideproxy" }}
{{- toYaml (merge $labels (.Values.commonLabels | default dict)) }}
{{- end }}

{{/* Immutable selector labels of one component: call with (dict "ctx" $ "component" "proxy"). */}}
{{- define "sideproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sideproxy.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: (dict "ctx" $ "component" "proxy"). */}}
{{- define "sideproxy.componentLabels" -}}
{{- $labels := include "sideproxy.labels" .ctx | fromYaml }}
{{- toYaml (merge (dict "app.kubernetes.io/component" .component) $labels) }}
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
What the operator does in each namespace it serves: exactly the table in the docstring of
sideproxy/operator/__init__.py (tests/chart/test_rbac.py compares the two). Namespaced mode
renders these rules as a Role per watched namespace, cluster-wide mode (operator.watchNamespaces
empty) as one ClusterRole. kopf runs with scanning disabled and peering off, so it needs no
cluster-scoped access to Namespaces, CRDs or peering objects; discovery (/apis) is open to every
authenticated user.
*/}}
{{- define "sideproxy.operator.rules" -}}
# kopf's indices and event handlers list and watch the pools and keys...
- apiGroups: ["sideproxy.dev"]
  resources: ["creditpools", "poolkeys"]
  verbs: ["list", "watch"]
# ...and the operator writes their status: phase, cool-downs, counters, conditions.
- apiGroups: ["sideproxy.dev"]
  resources: ["creditpools/status", "poolkeys/status"]
  verbs: ["patch"]
# The pool owns its <pool>-routing ConfigMap and <pool>-keys Secret (ownerReferences with
# blockOwnerDeletion, which OwnerReferencesPermissionEnforcement checks against this verb).
- apiGroups: ["sideproxy.dev"]
  resources: ["creditpools/finalizers"]
  verbs: ["update"]
# Secrets: it watches their metadata only (never data), reads by name the ones PoolKeys and
# clientAuth name (values stay in memory) and writes each pool's <pool>-keys. No delete: the
# garbage collector removes what a deleted pool owned.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch", "get", "create", "update"]
# The routing ConfigMaps it writes, watched by its label so a deleted or edited one is repaired.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "watch", "get", "create", "update"]
# Its own Events on transitions (kopf's event posting is off).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# VirtualKeys (issue 12): indexed and watched like PoolKeys; their status holds Ready and the
# usage the operator sums from the proxies' ReplicaReports, which it lists and watches.
- apiGroups: ["sideproxy.dev"]
  resources: ["virtualkeys", "replicareports"]
  verbs: ["list", "watch"]
- apiGroups: ["sideproxy.dev"]
  resources: ["virtualkeys/status"]
  verbs: ["patch"]
{{- end }}

{{/* The operator's leader-election Lease: its name, unique per release. */}}
{{- define "sideproxy.operator.leaseName" -}}
{{- include "sideproxy.operator.fullname" . }}
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
# The Kubernetes API server (only its endpoints' addresses when networkPolicy.apiServer.cidrs is set).
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- with .Values.networkPolicy.apiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
