package ztunnel

import (
	"crypto/rand"
	"encoding/hex"
	"strings"

	"github.com/warren-mesh/warren/pkg/config"
)

// The W3C trace-context and baggage headers ztunnel sends on every HBONE
// CONNECT (src/proxy.rs, src/proxy/outbound.rs in istio/ztunnel): a fresh
// traceparent per connection, and baggage describing the source workload.
// Inbound, warren reads the trace ID into the access log (trace_id) so one
// connection's two records can be joined.
const (
	headerTraceparent = "Traceparent"
	headerBaggage     = "Baggage"
)

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
// region and zone. Empty values are left out.
func baggage(w *config.Workload) string {
	if w == nil {
		return ""
	}
	kind := w.WorkloadType
	if kind == "" {
		kind = "pod"
	}
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+baggageEscape(v))
		}
	}
	add("k8s.cluster.name", w.ClusterID)
	add("k8s.namespace.name", w.Namespace)
	add("k8s."+kind+".name", name)
	add("service.name", w.CanonicalName)
	add("service.version", w.CanonicalRevision)
	add("cloud.region", w.Locality.Region)
	add("cloud.availability_zone", w.Locality.Zone)
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
