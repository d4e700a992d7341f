package policy_test

import (
	"net/netip"
	"os"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/localfile"
	"github.com/warren-mesh/warren/pkg/policy"
)

// TestExampleConfig runs decisions against examples/local-config.yaml, the
// way the agent will: file → snapshot → destination by IP → Authorize.
func TestExampleConfig(t *testing.T) {
	data, err := os.ReadFile("../../examples/local-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ok := func(string) error { return nil }
	s, err := localfile.Parse(data, config.Options{Node: "node-b", CheckNetns: ok, CheckCgroup: ok})
	if err != nil {
		t.Fatal(err)
	}
	const client = "spiffe://cluster.local/ns/default/sa/client"
	cases := []struct {
		name    string
		id, dst string
		allowed bool
		reason  policy.Reason
		dryRun  int
	}{
		{"mesh client to 8080", client, "198.18.2.20:8080", true, policy.ReasonAllowMatched, 0},
		{"mesh client to another port", client, "198.18.2.20:9090", false, policy.ReasonNoAllowMatched, 0},
		{"legacy namespace denied", "spiffe://cluster.local/ns/legacy/sa/x", "198.18.2.20:8080", false, policy.ReasonDenyMatched, 0},
		{"plaintext to a STRICT namespace", "", "198.18.2.20:8080", false, policy.ReasonStrictPlaintext, 0},
		{"dry-run deny is reported only", client, "198.18.2.21:9090", false, policy.ReasonNoAllowMatched, 1},
		{"plaintext to a PERMISSIVE workload", "", "198.18.2.30:5432", true, policy.ReasonNoAllowPolicy, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := netip.MustParseAddrPort(tc.dst)
			w, found := s.WorkloadByIP("", dst.Addr())
			if !found {
				t.Fatalf("no workload at %s", dst.Addr())
			}
			d := policy.Authorize(s, w, policy.Conn{SrcIdentity: tc.id, SrcIP: netip.MustParseAddr("198.18.1.10"), DstIP: dst.Addr(), DstPort: dst.Port()})
			if d.Allowed != tc.allowed || d.Reason != tc.reason || len(d.DryRun) != tc.dryRun {
				t.Errorf("got %s (dry-run %d), want allowed=%v %s (dry-run %d)", d, len(d.DryRun), tc.allowed, tc.reason, tc.dryRun)
			}
		})
	}
}
