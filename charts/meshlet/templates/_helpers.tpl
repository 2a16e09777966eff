{{/* Chart name, overridable. */}}
{{- define "meshlet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource-name prefix: the release name when it already says meshlet, else "<release>-meshlet". */}}
{{- define "meshlet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the control plane's Deployment, Service and ServiceAccount default. */}}
{{- define "meshlet.control.name" -}}
{{- printf "%s-control" (include "meshlet.fullname" .) -}}
{{- end -}}

{{- define "meshlet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshlet.control.name" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Kubernetes recommended labels. */}}
{{- define "meshlet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "meshlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshlet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "meshlet.control.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "meshlet.control.labels" -}}
{{ include "meshlet.labels" . }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{/* DNS name of the control plane's Service: what sidecars dial and what its serving certificate names. */}}
{{- define "meshlet.control.host" -}}
{{- printf "%s.%s.svc" (include "meshlet.control.name" .) .Release.Namespace -}}
{{- end -}}

{{- define "meshlet.issuerSecretName" -}}
{{- if eq .Values.identity.issuer.mode "existingSecret" -}}
{{- required "identity.issuer.existingSecret is required when identity.issuer.mode=existingSecret" .Values.identity.issuer.existingSecret -}}
{{- else -}}
{{- printf "%s-identity-issuer" (include "meshlet.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "meshlet.apiCertSecretName" -}}
{{- if eq .Values.webhook.certs.mode "existingSecret" -}}
{{- required "webhook.certs.existingSecret is required when webhook.certs.mode=existingSecret" .Values.webhook.certs.existingSecret -}}
{{- else -}}
{{- printf "%s-control-tls" (include "meshlet.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Whether injected proxies run as native sidecars. */}}
{{- define "meshlet.nativeSidecar" -}}
{{- $setting := toString .Values.proxy.nativeSidecar -}}
{{- if eq $setting "auto" -}}
{{- semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version -}}
{{- else if or (eq $setting "true") (eq $setting "false") -}}
{{- $setting -}}
{{- else -}}
{{- fail (printf "proxy.nativeSidecar must be auto, true or false, not %q" $setting) -}}
{{- end -}}
{{- end -}}
