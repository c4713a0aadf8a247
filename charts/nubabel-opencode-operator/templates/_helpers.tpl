{{/*
Names, labels, images and API versions shared by every template.
*/}}

{{/*
The release's base name: the release name (or fullnameOverride). Components append -operator
and -callback-api, so `helm install nubabel` gives nubabel-operator and nubabel-callback-api,
the names the binaries default to. At most 45 characters, to leave room for the suffixes.
*/}}
{{- define "nubabel.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{- define "nubabel.operator.fullname" -}}
{{- printf "%s-operator" (include "nubabel.fullname" .) }}
{{- end }}

{{- define "nubabel.callbackApi.fullname" -}}
{{- printf "%s-callback-api" (include "nubabel.fullname" .) }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "nubabel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: nubabel
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/*
Selector labels of the operator's pods. The operator is told these (NUBABEL_OPERATOR_POD_LABELS):
sidecar NetworkPolicies admit only pods carrying them.
*/}}
{{- define "nubabel.operator.selectorLabels" -}}
app.kubernetes.io/name: nubabel-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the callback API's pods. The operator is told these
(NUBABEL_CALLBACK_API_POD_LABELS): sidecar NetworkPolicies allow egress only to pods carrying them.
*/}}
{{- define "nubabel.callbackApi.selectorLabels" -}}
app.kubernetes.io/name: nubabel-callback-api
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nubabel.operator.labels" -}}
{{ include "nubabel.labels" . }}
{{ include "nubabel.operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "nubabel.callbackApi.labels" -}}
{{ include "nubabel.labels" . }}
{{ include "nubabel.callbackApi.selectorLabels" . }}
app.kubernetes.io/component: callback-api
{{- end }}

{{/* Selector labels as key=value,key=value, the form the operator's label flags parse. */}}
{{- define "nubabel.labelList" -}}
{{- $pairs := list }}
{{- range $key, $value := . }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
An image reference: registry/repository:tag. Call with (dict "image" .Values.x.image "root" $).
The tag falls back to image.tag, then to the chart's appVersion.
*/}}
{{- define "nubabel.image" -}}
{{- $registry := .root.Values.image.registry | trimSuffix "/" }}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "nubabel.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.operator.create }}
{{- default (include "nubabel.operator.fullname" .) .Values.serviceAccount.operator.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.operator.name }}
{{- end }}
{{- end }}

{{- define "nubabel.callbackApi.serviceAccountName" -}}
{{- if .Values.serviceAccount.callbackApi.create }}
{{- default (include "nubabel.callbackApi.fullname" .) .Values.serviceAccount.callbackApi.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.callbackApi.name }}
{{- end }}
{{- end }}

{{/* The leader-election Lease's name. */}}
{{- define "nubabel.leaseName" -}}
{{- default (include "nubabel.operator.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* The callback API's in-cluster URL, which the operator hands to every sidecar's bridge. */}}
{{- define "nubabel.callbackUrl" -}}
{{- if .Values.sidecar.callbackUrl }}
{{- .Values.sidecar.callbackUrl }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "nubabel.callbackApi.fullname" .) .Release.Namespace (int .Values.callbackApi.service.port) }}
{{- end }}
{{- end }}

{{/* The Secret the chart creates for the values given inline (database.url and so on). */}}
{{- define "nubabel.secretName" -}}
{{- printf "%s-credentials" (include "nubabel.fullname" .) }}
{{- end }}

{{/*
An env var read from a Secret: the existing one when named, else the chart's own.
Call with (dict "env" "NAME" "config" .Values.database "key" "database-url" "root" $).
*/}}
{{- define "nubabel.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      {{- if .config.existingSecret }}
      name: {{ .config.existingSecret }}
      key: {{ .config.existingSecretKey | default .key }}
      {{- else }}
      name: {{ include "nubabel.secretName" .root }}
      key: {{ .key }}
      {{- end }}
{{- end }}

{{/*
API versions. On a live cluster (install, upgrade, --dry-run=server) .Capabilities.APIVersions
is what the API server serves. Offline, `helm template` lists every version Helm knows
whatever --kube-version says, so the Kubernetes version must agree too: policy/v1
PodDisruptionBudgets exist from 1.21, autoscaling/v2 HorizontalPodAutoscalers from 1.23.
*/}}
{{- define "nubabel.pdb.apiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) }}
{{- "policy/v1" }}
{{- else }}
{{- "policy/v1beta1" }}
{{- end }}
{{- end }}

{{- define "nubabel.hpa.apiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "autoscaling/v2") (semverCompare ">=1.23-0" .Capabilities.KubeVersion.Version) }}
{{- "autoscaling/v2" }}
{{- else }}
{{- "autoscaling/v2beta2" }}
{{- end }}
{{- end }}
