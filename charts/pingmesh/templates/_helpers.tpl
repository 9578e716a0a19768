{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "pingmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: the release name when it already contains the
chart name (release "pingmesh" gives "pingmesh-operator"), else
<release>-<chart>. Kept to 52 characters so suffixes like "-operator" and
StatefulSet pod ordinals stay within 63.
*/}}
{{- define "pingmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pingmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object; the component helpers below add name, instance and
component.
*/}}
{{- define "pingmesh.baseLabels" -}}
helm.sh/chart: {{ include "pingmesh.chart" . }}
app.kubernetes.io/part-of: pingmesh
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of objects that belong to the release as a whole (CRD, RBAC, dashboards).
*/}}
{{- define "pingmesh.labels" -}}
{{ include "pingmesh.baseLabels" . }}
app.kubernetes.io/name: {{ include "pingmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Operator selector labels (stable across upgrades: never add to them).
*/}}
{{- define "pingmesh.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pingmesh.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "pingmesh.operator.labels" -}}
{{ include "pingmesh.baseLabels" . }}
{{ include "pingmesh.operator.selectorLabels" . }}
{{- end }}

{{- define "pingmesh.rqlite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pingmesh.name" . }}-rqlite
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: registry
{{- end }}

{{- define "pingmesh.rqlite.labels" -}}
{{ include "pingmesh.baseLabels" . }}
{{ include "pingmesh.rqlite.selectorLabels" . }}
{{- end }}

{{- define "pingmesh.operator.fullname" -}}
{{- printf "%s-operator" (include "pingmesh.fullname" .) }}
{{- end }}

{{- define "pingmesh.rqlite.fullname" -}}
{{- printf "%s-rqlite" (include "pingmesh.fullname" .) }}
{{- end }}

{{- define "pingmesh.rqlite.headless" -}}
{{- printf "%s-rqlite-headless" (include "pingmesh.fullname" .) }}
{{- end }}

{{- define "pingmesh.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.operator.create }}
{{- default (printf "%s-operator" (include "pingmesh.fullname" .)) .Values.serviceAccount.operator.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.operator.name }}
{{- end }}
{{- end }}

{{- define "pingmesh.agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.agent.create }}
{{- default (printf "%s-agent" (include "pingmesh.fullname" .)) .Values.serviceAccount.agent.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.agent.name }}
{{- end }}
{{- end }}

{{/*
Operator image reference: the digest wins over the tag; the tag defaults to
the chart's appVersion.
*/}}
{{- define "pingmesh.operator.image" -}}
{{- $image := .Values.operator.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's in-cluster DNS name, which agents dial.
*/}}
{{- define "pingmesh.operator.host" -}}
{{- printf "%s.%s.svc" (include "pingmesh.operator.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
Registry URL passed to `pingmesh-operator run --registry`: every rqlite
replica (the client fails over between them), or the SQLite file.
*/}}
{{- define "pingmesh.registryUrl" -}}
{{- if .Values.registry.rqlite.enabled }}
{{- $hosts := list }}
{{- $headless := include "pingmesh.rqlite.headless" . }}
{{- $fullname := include "pingmesh.rqlite.fullname" . }}
{{- range $i := until (int .Values.registry.rqlite.replicas) }}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc:4001" $fullname $i $headless $.Release.Namespace) }}
{{- end }}
{{- printf "rqlite://%s" (join "," $hosts) }}
{{- else }}
{{- print "sqlite:///var/lib/pingmesh/registry.db" }}
{{- end }}
{{- end }}

{{/*
Whether the cluster serves the Prometheus Operator's API.
*/}}
{{- define "pingmesh.hasMonitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/*
Fail early on combinations that would run but misbehave.
*/}}
{{- define "pingmesh.validate" -}}
{{- $election := .Values.operator.leaderElection }}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.registry.rqlite.enabled) }}
{{- fail "operator.replicas > 1 needs registry.rqlite.enabled=true: replicas cannot share one SQLite file" }}
{{- end }}
{{- if and (gt (int .Values.operator.replicas) 1) (not $election.enabled) }}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled=true: without a leader every replica would act" }}
{{- end }}
{{- if ge (int $election.renewDeadlineSeconds) (int $election.leaseDurationSeconds) }}
{{- fail "operator.leaderElection.renewDeadlineSeconds must be below leaseDurationSeconds, or two replicas could act at once" }}
{{- end }}
{{- if ge (int $election.retryPeriodSeconds) (int $election.renewDeadlineSeconds) }}
{{- fail "operator.leaderElection.retryPeriodSeconds must be below renewDeadlineSeconds" }}
{{- end }}
{{- if and (eq .Values.operator.grpcTls.mode "secret") (not .Values.operator.grpcTls.existingSecret) }}
{{- fail "operator.grpcTls.mode=secret needs operator.grpcTls.existingSecret (tls.crt, tls.key, ca.crt)" }}
{{- end }}
{{- if and .Values.operator.probeAuth.enabled (lt (int .Values.operator.probeAuth.rotationSeconds) 60) }}
{{- fail "operator.probeAuth.rotationSeconds must be at least 60" }}
{{- end }}
{{- end }}

{{/*
Secret holding the probe-key master secret (key master-key); empty when probe
authentication is off.
*/}}
{{- define "pingmesh.operator.probeAuthSecret" -}}
{{- $auth := .Values.operator.probeAuth }}
{{- if $auth.enabled }}{{ default (printf "%s-probe-auth" (include "pingmesh.operator.fullname" .)) $auth.existingSecret }}
{{- end }}
{{- end }}

{{/*
Secret holding the gRPC port's certificate (tls.crt, tls.key, ca.crt); empty
when TLS is disabled.
*/}}
{{- define "pingmesh.operator.grpcTlsSecret" -}}
{{- $tls := .Values.operator.grpcTls }}
{{- if eq $tls.mode "secret" }}{{ $tls.existingSecret }}
{{- else if eq $tls.mode "generate" }}{{ include "pingmesh.operator.fullname" . }}-grpc-tls
{{- end }}
{{- end }}

{{/*
Name of the leader election Lease (in the release namespace).
*/}}
{{- define "pingmesh.operator.leaseName" -}}
{{- include "pingmesh.operator.fullname" . }}
{{- end }}
