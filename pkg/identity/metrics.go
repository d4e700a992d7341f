package identity

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names.
const (
	metricCertificates = "warren_identity_certificates"
	metricExpiry       = "warren_identity_certificate_expiry_seconds"
	metricFetchErrors  = "warren_identity_fetch_errors_total"
	metricIdentities   = "warren_identity_identities"
)

// collector reports the Manager's state at scrape time, so nothing goes stale
// when identities come and go.
type collector struct {
	m            *Manager
	certificates *prometheus.Desc
	identities   *prometheus.Desc
	expiry       *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.certificates
	ch <- c.identities
	ch <- c.expiry
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	now := c.m.clock.Now()
	valid := 0
	for id, e := range c.m.entries {
		h := e.cur.Load()
		if h == nil {
			continue
		}
		if h.leafValid(now) {
			valid++
		}
		ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue,
			h.cert.Leaf.NotAfter.Sub(now).Seconds(), id.String())
	}
	ch <- prometheus.MustNewConstMetric(c.certificates, prometheus.GaugeValue, float64(valid))
	ch <- prometheus.MustNewConstMetric(c.identities, prometheus.GaugeValue, float64(len(c.m.entries)))
}

// registerMetrics registers m's metrics on reg (if any) and returns its
// fetch-error counter. Several Managers may share one registry as long as
// their provider names differ.
func registerMetrics(reg prometheus.Registerer, m *Manager) (prometheus.Counter, error) {
	labels := prometheus.Labels{"provider": m.providerName}
	c := &collector{
		m: m,
		certificates: prometheus.NewDesc(metricCertificates,
			"Workload certificates held and currently valid.", nil, labels),
		identities: prometheus.NewDesc(metricIdentities,
			"Workload identities held for pods on this node, with or without a valid certificate.", nil, labels),
		expiry: prometheus.NewDesc(metricExpiry,
			"Seconds until the workload certificate of an identity expires (negative once expired).", []string{"identity"}, labels),
	}
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricFetchErrors,
		Help: "Failed certificate fetches, including certificates refused by the manager's checks.",
	}, []string{"provider"})
	if reg == nil {
		return errs.WithLabelValues(m.providerName), nil
	}
	if err := reg.Register(c); err != nil {
		return nil, fmt.Errorf("register identity metrics: %w", err)
	}
	if err := reg.Register(errs); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, fmt.Errorf("register %s: %w", metricFetchErrors, err)
		}
		errs = are.ExistingCollector.(*prometheus.CounterVec)
	}
	return errs.WithLabelValues(m.providerName), nil
}
