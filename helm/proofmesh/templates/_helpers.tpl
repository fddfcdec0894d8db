{{/* Chart name, truncated to a DNS label. */}}
{{- define "proofmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource. */}}
{{- define "proofmesh.fullname" -}}
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

{{/* Name of a component's resources: <fullname>-<suffix>. */}}
{{- define "proofmesh.componentName" -}}
{{- printf "%s-%s" (include "proofmesh.fullname" .root) .suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "proofmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every pod of the release carries; the metrics Service selects on them. */}}
{{- define "proofmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "proofmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels of every resource. */}}
{{- define "proofmesh.labels" -}}
helm.sh/chart: {{ include "proofmesh.chart" . }}
{{ include "proofmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: proofmesh
{{- end }}

{{/* Selector labels of one component: root, component, and pool for worker pools. */}}
{{- define "proofmesh.componentSelectorLabels" -}}
{{ include "proofmesh.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
proofmesh.io/pool: {{ .name }}
{{- end }}
{{- end }}

{{/* Labels of a component's resources and pods. */}}
{{- define "proofmesh.componentLabels" -}}
{{ include "proofmesh.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
proofmesh.io/pool: {{ .name }}
proofmesh.io/role: {{ .role }}
{{- end }}
{{- end }}

{{- define "proofmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "proofmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "proofmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The scheduler's URL as workers, the gateway and the compressor reach it. */}}
{{- define "proofmesh.schedulerAddress" -}}
{{- if .Values.scheduler.address }}
{{- .Values.scheduler.address }}
{{- else if .Values.scheduler.enabled }}
{{- printf "http://%s:50051" (include "proofmesh.componentName" (dict "root" . "suffix" "scheduler")) }}
{{- else }}
{{- fail "scheduler.address is required when scheduler.enabled is false (the central scheduler's URL, e.g. http://proofmesh-scheduler.central.example:50051)" }}
{{- end }}
{{- end }}

{{/*
One worker pool with workerDefaults filled in, as YAML (use with fromYaml). Keys are copied
one by one (not sprig merge, which replaces false/0/null with the default).
*/}}
{{- define "proofmesh.pool" -}}
{{- $defaults := .root.Values.workerDefaults }}
{{- $pool := dict }}
{{- range $k, $v := $defaults }}{{ $_ := set $pool $k $v }}{{ end }}
{{- range $k, $v := .pool }}{{ $_ := set $pool $k $v }}{{ end }}
{{- range $nested := list "autoscaling" "podDisruptionBudget" }}
{{- $m := dict }}
{{- range $k, $v := (index $defaults $nested | default dict) }}{{ $_ := set $m $k $v }}{{ end }}
{{- range $k, $v := (index $.pool $nested | default dict) }}{{ $_ := set $m $k $v }}{{ end }}
{{- $_ := set $pool $nested $m }}
{{- end }}
{{- toYaml $pool }}
{{- end }}

{{/* The pools, checked: names unique. Returns {pools: [...]} as YAML. */}}
{{- define "proofmesh.pools" -}}
{{- $seen := dict }}
{{- $pools := list }}
{{- range .Values.workerPools }}
{{- if hasKey $seen .name }}
{{- fail (printf "workerPools: the name %q is used twice" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- $pools = append $pools (include "proofmesh.pool" (dict "root" $ "pool" .) | fromYaml) }}
{{- end }}
{{- toYaml (dict "pools" $pools) }}
{{- end }}

{{/* The zone a pod reports: its own pinned zone, else global.defaultZone. */}}
{{- define "proofmesh.zone" -}}
{{- default .root.Values.global.defaultZone .zone }}
{{- end }}

{{/* The queue kind a worker role's jobs are counted under in proofmesh_queue_depth. */}}
{{- define "proofmesh.queueKind" -}}
{{- if eq .role "witness-generator" }}witness_generation{{ else }}proving{{ end }}
{{- end }}

{{/* Environment every Proofmesh container gets. */}}
{{- define "proofmesh.commonEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if .Values.tls.enabled }}
# Mutual TLS: the component's certificate Secret (cert-manager keys tls.crt, tls.key, ca.crt),
# mounted as a directory so rotated files appear in place; re-read every reloadSecs.
- name: PROOFMESH_TLS_CERT
  value: /etc/proofmesh/tls/tls.crt
- name: PROOFMESH_TLS_KEY
  value: /etc/proofmesh/tls/tls.key
- name: PROOFMESH_TLS_CA
  value: /etc/proofmesh/tls/ca.crt
- name: PROOFMESH_TLS_RELOAD_SECS
  value: {{ .Values.tls.reloadSecs | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* envFrom of every container: the object-store credentials Secret, when set. */}}
{{- define "proofmesh.envFrom" -}}
{{- with .Values.artifacts.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every Proofmesh pod. */}}
{{- define "proofmesh.podCommon" -}}
serviceAccountName: {{ include "proofmesh.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container-level settings shared by every Proofmesh container. */}}
{{- define "proofmesh.containerCommon" -}}
image: {{ include "proofmesh.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod annotations. */}}
{{- define "proofmesh.podAnnotations" -}}
{{- with .Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Volume of the shared artifact store. */}}
{{- define "proofmesh.artifactsVolume" -}}
- name: artifacts
{{- if .Values.artifacts.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.artifacts.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.artifacts.emptyDirSizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{/* Volume of the setup-data cache. */}}
{{- define "proofmesh.setupVolume" -}}
- name: setup
{{- if .Values.setupCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.setupCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.setupCache.emptyDirSizeLimit }}
{{- end }}
{{- end }}

{{/* The artifact store's URL (--artifacts): artifacts.url, else the mounted volume. */}}
{{- define "proofmesh.artifactsUrl" -}}
{{- .Values.artifacts.url | default "file:///var/lib/proofmesh/data" -}}
{{- end }}

{{/* Mounts of the artifact store and /tmp (and, with TLS, the certificate Secret). */}}
{{- define "proofmesh.artifactsMounts" -}}
- name: artifacts
  mountPath: /var/lib/proofmesh/data
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/proofmesh/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The TLS Secret of certificate "name" (a component or a worker pool): <fullname>-<name>-tls. */}}
{{- define "proofmesh.tlsSecretName" -}}
{{- printf "%s-tls" (include "proofmesh.componentName" (dict "root" .root "suffix" .name)) }}
{{- end }}

{{/* The TLS volume of certificate "name", when tls.enabled. */}}
{{- define "proofmesh.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "proofmesh.tlsSecretName" . }}
{{- end }}
{{- end }}

{{/* The DNS name every prover certificate carries; WVGs check provers against it (they are
reached at pod IPs). */}}
{{- define "proofmesh.proverTlsName" -}}
{{- printf "%s.provers" (include "proofmesh.fullname" .) }}
{{- end }}

{{/* A readiness/liveness probe of a gRPC port: grpc.health.v1 in plaintext; with TLS, a TCP
check (the kubelet's gRPC probe cannot present a client certificate). */}}
{{- define "proofmesh.grpcProbe" -}}
{{- if .root.Values.tls.enabled }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
{{- end }}
{{- end }}

{{/* Node selector with an optional zone pin. */}}
{{- define "proofmesh.nodeSelector" -}}
{{- $sel := dict }}
{{- range $k, $v := (.nodeSelector | default dict) }}{{ $_ := set $sel $k $v }}{{ end }}
{{- with .zone }}{{ $_ := set $sel "topology.kubernetes.io/zone" . }}{{ end }}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
