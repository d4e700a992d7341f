package store

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/warren-mesh/warren/pkg/config"
)

func TestCollectorInvalidRules(t *testing.T) {
	st := New("n1")
	c := NewCollector(st)
	if n := testutil.CollectAndCount(c, MetricInvalidRules); n != 0 {
		t.Fatalf("%d series before any policy", n)
	}
	snap, err := config.NewSnapshot(config.Config{Policies: []*config.AuthorizationPolicy{
		{Name: "ok", Namespace: "a", Scope: config.ScopeNamespace, Action: config.ActionAllow},
		{Name: "bad", Namespace: "a", Scope: config.ScopeNamespace, Action: config.ActionDeny,
			Invalid: []string{"rules[0]: x", "rules[2]: y"}},
	}}, config.Options{Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	st.Publish(snap)
	want := `
# HELP warren_config_invalid_rules Authorization-policy rules holding a value that could not be parsed; they fail closed (ALLOW: match nothing; DENY: match everything in scope).
# TYPE warren_config_invalid_rules gauge
warren_config_invalid_rules{action="DENY",policy="a/bad"} 2
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), MetricInvalidRules); err != nil {
		t.Error(err)
	}
}
