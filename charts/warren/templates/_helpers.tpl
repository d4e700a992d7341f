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

{{/* ca.provider, checked. The node agents never hold the CA key: builtin
(an in-process CA with the key in every agent) is for the local-file mode
and `make demo`, not for the chart. */}}
{{- define "warren.caProvider" -}}
{{- $p := .Values.ca.provider -}}
{{- if eq $p "builtin" -}}
{{- fail "ca.provider \"builtin\" is not available in the chart: it would mount the mesh's CA private key into every node agent, so whoever takes over one node could mint any identity. Use ca.provider=warren (the default: the CA service holds the key and signs only for pods on the caller's node), spire or istiod." -}}
{{- end -}}
{{- if not (has $p (list "warren" "spire" "istiod")) -}}
{{- fail (printf "ca.provider %q: want one of warren, spire, istiod" $p) -}}
{{- end -}}
{{- $p -}}
{{- end -}}

{{/* The CA service's name (Deployment, Service, ServiceAccount, RBAC). */}}
{{- define "warren.caServiceName" -}}
{{- printf "%s-ca" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ConfigMap with the root certificate (no key) that agents mount. */}}
{{- define "warren.caRootConfigMap" -}}
{{- printf "%s-ca-root" (include "warren.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Where agents reach the CA service. */}}
{{- define "warren.caAddr" -}}
{{- printf "%s.%s.svc:%v" (include "warren.caServiceName" .) .Release.Namespace .Values.ca.warren.port -}}
{{- end -}}

{{/* provider, checked: kubernetes, or istiod with ca.provider=istiod (the
agent reads istiod's xDS with the CA's root and token, as ztunnel does). */}}
{{- define "warren.provider" -}}
{{- $p := .Values.provider -}}
{{- if not (has $p (list "kubernetes" "istiod")) -}}
{{- fail (printf "provider %q: want kubernetes or istiod" $p) -}}
{{- end -}}
{{- if and (eq $p "istiod") (ne .Values.ca.provider "istiod") -}}
{{- fail (printf "provider=istiod needs ca.provider=istiod (got %q): the agent reaches istiod's xDS with the same root ConfigMap and projected token as its CA, as ztunnel does" .Values.ca.provider) -}}
{{- end -}}
{{- $p -}}
{{- end -}}
