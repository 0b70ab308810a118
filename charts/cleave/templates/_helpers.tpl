{{- define "cleave.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{- define "cleave.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cleave.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "cleave.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "router") */}}
{{- define "cleave.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cleave.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cleave.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "cleave.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "cleave.fullname" .) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "cleave.eventsBootstrap" -}}
{{- if .Values.broker.enabled -}}
{{- printf "%s-broker:%d" (include "cleave.fullname" .) (int .Values.broker.port) -}}
{{- else -}}
{{- .Values.broker.externalBootstrap -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context: non-root, no privilege, default seccomp. */}}
{{- define "cleave.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cleave.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Writable scratch on a read-only root: /tmp and the cache folder. */}}
{{- define "cleave.scratchVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/cleave/.cache
{{- end -}}

{{- define "cleave.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end -}}

{{- define "cleave.metricsAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/*
The roles: name, values key, gRPC port, metrics port (the router's metrics are on its HTTP port).
*/}}
{{- define "cleave.roles" -}}
router: {key: router, port: 50051, metricsPort: 8000, httpPort: 8000}
prefill: {key: prefill, port: 50070, metricsPort: 9470}
decode: {key: decode, port: 50080, metricsPort: 9480}
kvstore: {key: kvstore, port: 50060, metricsPort: 9460}
expert: {key: experts, port: 50090, metricsPort: 9490, streamPort: 50091}
{{- end -}}


{{/* The operator's namespaced rules: its resource, the children it owns, Events. */}}
{{- define "cleave.operatorRules" -}}
- apiGroups: ["cleave.dev"]
  resources: ["llmdeployments"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["cleave.dev"]
  resources: ["llmdeployments/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
