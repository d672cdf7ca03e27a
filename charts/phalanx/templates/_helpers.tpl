{{- define "phalanx.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "phalanx.labels" -}}
app.kubernetes.io/name: phalanx
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "phalanx.selector" -}}
app.kubernetes.io/name: phalanx
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* Rules the values schema cannot express (it compares no two values). */ -}}
{{- define "phalanx.validate" -}}
{{- if eq (int .Values.operator.metricsPort) (int .Values.operator.livenessPort) -}}
{{- fail (printf "operator.metricsPort and operator.livenessPort are both %v: the operator cannot serve /metrics and /healthz on one port; choose two ports" .Values.operator.metricsPort) -}}
{{- end -}}
{{- end -}}

{{- define "phalanx.monitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .kind) -}}true{{- end -}}
{{- end -}}
