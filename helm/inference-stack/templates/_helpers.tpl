{{/* Names, labels, the typed config (INFER_*), security contexts: defined once, used by every template. */}}

{{- define "inference-stack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inference-stack.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{/* 40 characters: KubeRay appends suffixes (-raycluster-xxxxx-head-svc) and Service names stop at 63. */}}

{{- define "inference-stack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inference-stack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "inference-stack.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "inference-stack.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inference-stack
{{- end -}}

{{- define "inference-stack.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "inference-stack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inference-stack.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "inference-stack.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "inference-stack.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "inference-stack.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "inference-stack.fullname" .) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "inference-stack.otelEndpoint" -}}
{{- if .Values.otel.collector.enabled -}}
{{- printf "http://%s-otel-collector:4317" (include "inference-stack.fullname" .) -}}
{{- else -}}
{{- .Values.otel.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "inference-stack.modelDir" -}}
{{- if eq .Values.model.source "image" -}}
{{- .Values.model.path -}}
{{- else -}}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.path) -}}
{{- end -}}
{{- end -}}

{{- define "inference-stack.draftDir" -}}
{{- if not .Values.model.draftPath -}}
{{- else if eq .Values.model.source "image" -}}
{{- .Values.model.draftPath -}}
{{- else -}}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.draftPath) -}}
{{- end -}}
{{- end -}}

{{/*
The stack's typed config (services/config.py StackConfig), lowercase names without the INFER_
prefix, every value a string. Rendered twice from this one dict: as INFER_* env vars on every Ray
container and as the Serve application's args, so the two can never disagree.
Integers go through `int64`: Helm parses YAML numbers as float64 and would print 1048576 as 1.048576e+06.
*/}}
{{- define "inference-stack.config" -}}
{{- $v := .Values -}}
{{- $c := dict
  "model" (include "inference-stack.modelDir" .)
  "model_name" $v.model.name
  "draft_model" (include "inference-stack.draftDir" .)
  "host" "0.0.0.0"
  "http_port" ($v.serve.httpPort | int64 | toString)
  "grpc_port" ($v.serve.grpcPort | int64 | toString)
  "llm_min_replicas" ($v.serve.llm.minReplicas | int64 | toString)
  "llm_max_replicas" ($v.serve.llm.maxReplicas | int64 | toString)
  "llm_num_gpus" ($v.serve.llm.numGpus | toString)
  "llm_num_cpus" ($v.serve.llm.numCpus | toString)
  "llm_target_ongoing_requests" ($v.serve.llm.targetOngoingRequests | int64 | toString)
  "llm_max_queued_requests" ($v.serve.llm.maxQueuedRequests | int64 | toString)
  "gateway_replicas" ($v.serve.gateway.replicas | int64 | toString)
  "gateway_mode" $v.serve.gateway.mode
  "gateway_num_cpus" ($v.serve.gateway.numCpus | toString)
  "direct_grpc_port" ($v.serve.gateway.directGrpcPort | int64 | toString)
  "grammar_replicas" ($v.serve.grammar.replicas | int64 | toString)
  "grammar_workers" ($v.serve.grammar.workers | int64 | toString)
  "grammar_compile_threads" ($v.serve.grammar.compileThreads | int64 | toString)
  "grammar_warm_up" ($v.serve.grammar.warmUp | toString)
  "draft_replicas" ($v.serve.draft.replicas | int64 | toString)
  "redis_url" (include "inference-stack.redisUrl" .)
  "kv_tier_write_policy" $v.serve.kvTier.writePolicy
  "api_keys_file" (ternary "" (printf "/etc/inference/api-keys/%s" $v.apiKeys.secretKey) $v.serve.authDisabled)
  "auth_disabled" ($v.serve.authDisabled | toString)
  "max_body_bytes" ($v.serve.maxBodyBytes | int64 | toString)
  "otel_exporter" $v.otel.exporter
  "otel_endpoint" (ternary (include "inference-stack.otelEndpoint" .) "" (eq $v.otel.exporter "otlp"))
  "service_name" (default (include "inference-stack.fullname" .) $v.otel.serviceName)
-}}
{{- range $k, $val := $v.serve.engine -}}
{{- if kindIs "invalid" $val -}}
{{- /* null: keep the engine's default */ -}}
{{- else if and (kindIs "float64" $val) (eq (floor $val) $val) -}}
{{- $_ := set $c (printf "engine_%s" $k) ($val | int64 | toString) -}}
{{- else -}}
{{- $_ := set $c (printf "engine_%s" $k) ($val | toString) -}}
{{- end -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "inference-stack.env" -}}
{{- range $k, $val := (include "inference-stack.config" . | fromYaml) }}
- name: {{ printf "INFER_%s" (upper $k) }}
  value: {{ $val | toString | quote }}
{{- end }}
{{- end -}}

{{/* Restricted pod security profile: https://kubernetes.io/docs/concepts/security/pod-security-standards/ */}}
{{- define "inference-stack.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser | int64 }}
runAsGroup: {{ .Values.securityContext.runAsGroup | int64 }}
fsGroup: {{ .Values.securityContext.fsGroup | int64 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "inference-stack.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod labels of every Ray pod (head and workers): NetworkPolicies and Services select on them. */}}
{{- define "inference-stack.rayPodLabels" -}}
{{ include "inference-stack.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{/* Volumes of every Ray pod. Root filesystem is read-only: Ray's session files go to /tmp,
     its object store to /dev/shm (memory-backed, sized per group). */}}
{{- define "inference-stack.rayVolumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- if not $v.serve.authDisabled }}
- name: api-keys
  secret:
    secretName: {{ include "inference-stack.apiKeysSecret" .root }}
    items:
      - key: {{ $v.apiKeys.secretKey }}
        path: {{ $v.apiKeys.secretKey }}
{{- end }}
{{- if eq $v.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName }}
{{- else if eq $v.model.source "hostPath" }}
- name: models
  hostPath:
    path: {{ $v.model.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "inference-stack.rayVolumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /home/app}
- {name: dshm, mountPath: /dev/shm}
{{- if not .Values.serve.authDisabled }}
- {name: api-keys, mountPath: /etc/inference/api-keys, readOnly: true}
{{- end }}
{{- if ne .Values.model.source "image" }}
- {name: models, mountPath: /models, readOnly: true}
{{- end }}
{{- end -}}
