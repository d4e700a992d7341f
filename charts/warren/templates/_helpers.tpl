{{/* The release's base name. */}}
{{- define "warren.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "warren.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "warren.labels" -}}
{{ include "warren.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "warren.serviceAccountName" -}}
{{- default (include "warren.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "warren.caSecretName" -}}
{{- default (printf "%s-ca" (include "warren.fullname" .)) .Values.ca.existingSecret -}}
{{- end -}}

{{/* ca.provider, checked: the agent's --ca-provider values. */}}
{{- define "warren.caProvider" -}}
{{- $p := .Values.ca.provider -}}
{{- if not (has $p (list "builtin" "spire" "istiod")) -}}
{{- fail (printf "ca.provider %q: want one of builtin, spire, istiod" $p) -}}
{{- end -}}
{{- $p -}}
{{- end -}}
