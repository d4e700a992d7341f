package ztunnel

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"strings"

	"github.com/warren-mesh/warren/pkg/config"
)

// The W3C trace-context and baggage headers ztunnel sends on every HBONE
// CONNECT: a fresh traceparent per connection, and baggage describing the
// source workload. Inbound, warren reads the trace ID into the access log
// (trace_id) so one connection's two records can be joined.
//
// The format follows istio/ztunnel at commit
// 62d826530e5ce85764e309170205b293efcbc80b:
//   - src/proxy/outbound.rs create_hbone_request: headers baggage, forwarded
//     and traceparent on every CONNECT (names lower case, as HTTP/2 sends all).
//   - src/proxy.rs TraceParent::new and its Debug format: version 00, a
//     random 128-bit trace ID and 64-bit parent ID in lower-case hex
//     (32 and 16 digits, zero-padded), flags 00 (not sampled).
//   - src/baggage.rs baggage_header_val with src/state/workload.rs
//     Workload::baggage: key=value pairs joined by "," in this order,
//     each left out when its value is empty: k8s.cluster.name,
//     k8s.namespace.name, k8s.<workload type>.name (type deployment,
//     cronjob, pod or job, the workload API's enum in lower case),
//     service.name (canonical name), service.version (canonical revision),
//     cloud.region, cloud.availability_zone.
//
// Two deliberate differences, neither visible for Kubernetes names: ztunnel
// writes values raw, warren percent-encodes what W3C baggage forbids in a
// value (so a locality with a comma cannot forge a key); and a workload
// whose provider gives no type (the file and Kubernetes providers) is named
// by its own name as k8s.pod.name, where ztunnel always has a type.
// tests/interop TestWarrenTraceHeadersAtIstioServer checks the headers as
// Istio's own HBONE server receives them.
const (
	headerTraceparent = "Traceparent"
	headerBaggage     = "Baggage"
)

// SetTraceHeaders sets on h the trace headers of one outbound HBONE CONNECT,
// as ztunnel sends them: a fresh traceparent and, when src describes
// anything, src's baggage. It returns the trace ID, which the access log
// records as trace_id. The outbound proxy builds every CONNECT with it.
func SetTraceHeaders(h http.Header, src *config.Workload) (traceID string) {
	tp, traceID := newTraceparent()
	h.Set(headerTraceparent, tp)
	if bg := baggage(src); bg != "" {
		h.Set(headerBaggage, bg)
	}
	return traceID
}

// TraceID returns the trace ID of a CONNECT's traceparent header, or "" when
// it has none or it is malformed (inbound, the access log's trace_id).
func TraceID(h http.Header) string {
	return parseTraceparent(h.Get(headerTraceparent))
}

// newTraceparent returns a traceparent header value with a random trace ID
// and span ID (version 00, not sampled: warren records no spans), and the
// trace ID.
func newTraceparent() (header, traceID string) {
	var b [24]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	traceID = hex.EncodeToString(b[:16])
	return "00-" + traceID + "-" + hex.EncodeToString(b[16:]) + "-00", traceID
}

// parseTraceparent returns the trace ID of a version-00 traceparent value,
// or "" if the value is malformed (it is then ignored, as the W3C
// specification asks).
func parseTraceparent(v string) string {
	parts := strings.Split(strings.TrimSpace(v), "-")
	if len(parts) != 4 || parts[0] != "00" || len(parts[1]) != 32 || len(parts[2]) != 16 || len(parts[3]) != 2 {
		return ""
	}
	for _, p := range parts[1:] {
		if _, err := hex.DecodeString(p); err != nil || strings.ToLower(p) != p {
			return ""
		}
	}
	if strings.Trim(parts[1], "0") == "" || strings.Trim(parts[2], "0") == "" {
		return ""
	}
	return parts[1]
}

// baggage describes the source workload with ztunnel's keys: cluster,
// namespace, workload name by kind, canonical service name and version,
// region and zone. Empty values are left out. A workload without a type
// (providers other than istiod) is named by its own name as a pod.
func baggage(w *config.Workload) string {
	if w == nil {
		return ""
	}
	m, l := w.Meta(), w.Locality()
	kind, name := m.WorkloadType, m.WorkloadName
	if kind == "" {
		kind = "pod"
		if name == "" {
			name = w.Name
		}
	}
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+baggageEscape(v))
		}
	}
	add("k8s.cluster.name", m.ClusterID)
	add("k8s.namespace.name", w.Namespace)
	add("k8s."+kind+".name", name)
	add("service.name", m.CanonicalName)
	add("service.version", m.CanonicalRevision)
	add("cloud.region", l.Region)
	add("cloud.availability_zone", l.Zone)
	return strings.Join(parts, ",")
}

// baggageEscape percent-encodes what a W3C baggage value may not hold.
func baggageEscape(v string) string {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c > 0x20 && c < 0x7f && c != ',' && c != ';' && c != '\\' && c != '"' && c != '%' && c != '=' {
			b.WriteByte(c)
			continue
		}
		b.WriteString("%" + strings.ToUpper(hex.EncodeToString([]byte{c})))
	}
	return b.String()
}
