package store

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/warren-mesh/warren/pkg/config"
)

// MetricInvalidRules is the gauge of authorization-policy rules that hold a
// value no provider could parse, by policy ("namespace/name") and action.
// Such rules fail closed (see package istioval); a non-zero value means a
// policy denies more than its author intended.
const MetricInvalidRules = "warren_config_invalid_rules"

// Collector exports facts about the current snapshot; register it with
// prometheus.Registerer.MustRegister.
type Collector struct {
	st      *Store
	invalid *prometheus.Desc
	gen     *prometheus.Desc
}

// NewCollector returns a collector reading st at every scrape.
func NewCollector(st *Store) *Collector {
	return &Collector{st: st,
		invalid: prometheus.NewDesc(MetricInvalidRules,
			"Authorization-policy rules holding a value that could not be parsed; they fail closed (ALLOW: match nothing; DENY: match everything in scope).",
			[]string{"policy", "action"}, nil),
		gen: prometheus.NewDesc("warren_config_generation", "Snapshots published since the agent started.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) { ch <- c.invalid; ch <- c.gen }

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.gen, prometheus.GaugeValue, float64(c.st.Generation()))
	for _, p := range c.st.Current().Policies() {
		if len(p.Invalid) > 0 {
			ch <- prometheus.MustNewConstMetric(c.invalid, prometheus.GaugeValue, float64(len(p.Invalid)), p.Key(), actionLabel(p.Action))
		}
	}
}

func actionLabel(a config.Action) string {
	if a == config.ActionDeny {
		return "DENY"
	}
	return "ALLOW"
}
