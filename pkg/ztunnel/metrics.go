package ztunnel

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/warren-mesh/warren/pkg/loader"
)

// Istio's TCP metric labels, as ztunnel reports them (a subset: those an L4
// data plane without canonical-service data can fill).
var connLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_service", "destination_service_name", "destination_service_namespace",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Reporter values: which end of the connection reports it.
const (
	reporterSource      = "source"
	reporterDestination = "destination"
)

// connection_security_policy values, as ztunnel reports them.
const (
	securityMutualTLS = "mutual_tls"
	securityUnknown   = "unknown"
)

// Response flags: ztunnel's values (src/proxy/metrics.rs, ResponseFlags and
// its EncodeLabelValue) for the conditions ztunnel names, and two of Envoy's
// for conditions ztunnel records no metric for. README.md ("Metrics") has
// the table of when each is set and by which reporter. ztunnel's
// TLS_FAILURE, H2_HANDSHAKE_FAILURE, IDENTITY_ERROR and CERT_REVOKED are not
// set: a tunnel that fails in those phases is CONNECT (pkg/hbone's errors do
// not say the phase), and warren checks no revocation lists.
const (
	flagNone          = "-"              // ResponseFlags::None
	flagDenied        = "DENY"           // ResponseFlags::AuthorizationPolicyDenied
	flagConnect       = "CONNECT"        // ResponseFlags::ConnectionFailure
	flagNetworkPolicy = "NETWORK_POLICY" // ResponseFlags::NetworkPolicyError
	flagNoHealthy     = "UH"             // warren (Envoy): a service without a healthy endpoint
	flagNoOrigDst     = "NR"             // warren (Envoy): the original destination was lost
)

// Metrics holds the agent's Prometheus series. Create it with NewMetrics and
// register it once; a nil *Metrics records nothing.
type Metrics struct {
	opened, closed, failed *prometheus.CounterVec
	sent, received         *prometheus.CounterVec
	srcMismatch            prometheus.Counter
}

// NewMetrics creates the istio_tcp_* series and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	vec := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, connLabels)
	}
	m := &Metrics{
		opened:   vec("istio_tcp_connections_opened_total", "TCP connections opened."),
		closed:   vec("istio_tcp_connections_closed_total", "TCP connections closed."),
		failed:   vec("istio_tcp_connections_failed_total", "TCP connections that failed or were refused."),
		sent:     vec("istio_tcp_sent_bytes_total", "Bytes sent to the client (upstream to downstream)."),
		received: vec("istio_tcp_received_bytes_total", "Bytes received from the client (downstream to upstream)."),
		srcMismatch: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "warren_hbone_source_mismatch_total",
			Help: "HBONE tunnels refused because their source address is not a workload of the peer certificate's identity.",
		}),
	}
	reg.MustRegister(m.opened, m.closed, m.failed, m.sent, m.received, m.srcMismatch)
	return m
}

// sourceMismatch counts an HBONE tunnel refused by verifySource.
func (m *Metrics) sourceMismatch() {
	if m != nil {
		m.srcMismatch.Inc()
	}
}

// connLabelValues are one connection's label values, in connLabels order.
type connLabelValues struct {
	reporter                                 string
	srcWorkload, srcNamespace, srcPrincipal  string
	dstWorkload, dstNamespace, dstPrincipal  string
	dstService, dstServiceName, dstServiceNS string
	responseFlags, securityPolicy            string
}

func (v connLabelValues) values() []string {
	flags := v.responseFlags
	if flags == "" {
		flags = flagNone
	}
	unknown := func(s string) string {
		if s == "" {
			return "unknown"
		}
		return s
	}
	return []string{
		v.reporter,
		unknown(v.srcWorkload), unknown(v.srcNamespace), unknown(v.srcPrincipal),
		unknown(v.dstWorkload), unknown(v.dstNamespace), unknown(v.dstPrincipal),
		unknown(v.dstService), unknown(v.dstServiceName), unknown(v.dstServiceNS),
		"tcp", flags, unknown(v.securityPolicy),
	}
}

func (m *Metrics) open(v connLabelValues) {
	if m != nil {
		m.opened.WithLabelValues(v.values()...).Inc()
	}
}

// close records a connection's end, as ztunnel's ConnectionResult does: the
// bytes it moved (received from the client, sent to it) count under the
// labels it opened with; the close counts under the same labels with flags
// as response_flags, and a non-empty flags (a relay that ended in error, a
// connection a policy change no longer allows) also counts as failed.
func (m *Metrics) close(v connLabelValues, flags string, received, sent int64) {
	if m == nil {
		return
	}
	lv := v.values()
	m.received.WithLabelValues(lv...).Add(float64(received))
	m.sent.WithLabelValues(lv...).Add(float64(sent))
	if flags == "" {
		m.closed.WithLabelValues(lv...).Inc()
		return
	}
	v.responseFlags = flags
	lv = v.values()
	m.closed.WithLabelValues(lv...).Inc()
	m.failed.WithLabelValues(lv...).Inc()
}

// fail records a connection that never got through, as ztunnel does: it
// counts as opened and closed (with its response flags and no bytes) and as
// failed, so dashboards on either series see it.
func (m *Metrics) fail(v connLabelValues) {
	if m == nil {
		return
	}
	lv := v.values()
	m.opened.WithLabelValues(lv...).Inc()
	m.closed.WithLabelValues(lv...).Inc()
	m.failed.WithLabelValues(lv...).Inc()
}

// StatsReader is what the BPF collector reads: the loader's counters.
type StatsReader interface {
	Stats() (loader.Stats, error)
}

// BPFCollector exports the loader's per-CPU capture counters at scrape time.
type BPFCollector struct {
	src  StatsReader
	desc *prometheus.Desc
}

// NewBPFCollector returns a collector of src's counters as warren_bpf_events_total{event=...}.
func NewBPFCollector(src StatsReader) *BPFCollector {
	return &BPFCollector{
		src:  src,
		desc: prometheus.NewDesc("warren_bpf_events_total", "Capture decisions and errors counted by the BPF programs.", []string{"event"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *BPFCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *BPFCollector) Collect(ch chan<- prometheus.Metric) {
	s, err := c.src.Stats()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for event, v := range s.Events() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(v), event)
	}
}
