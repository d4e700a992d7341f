package localfile

import (
	"os"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
)

// FuzzParse checks that no input panics the decoder or the validator, and
// that every accepted snapshot answers its own lookups.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile("../testdata/local-config.yaml"); err == nil {
		f.Add(data)
	}
	f.Add([]byte(ztunnelShaped))
	f.Add([]byte("workloads: [{uid: a, name: a, namespace: n, workloadIps: ['::ffff:1.2.3.4']}]\n"))
	f.Add([]byte("policies: [{name: p, namespace: n, scope: Global, action: Deny, rules: [[[{principals: ['*'], notSourceIps: ['1.2.3.4']}]]]}]\n"))
	f.Add([]byte("a: &x [*x]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse(data, config.Options{Node: "node-a", CheckNetns: func(string) error { return nil }})
		if err != nil {
			return
		}
		for _, w := range s.Workloads() {
			for _, ip := range w.WorkloadIPs {
				if got, ok := s.WorkloadByIP(w.Network, ip); !ok || got != w {
					t.Fatalf("workload %s not found by its IP %s", w.UID, ip)
				}
			}
			_ = s.PoliciesFor(w)
			_ = s.MTLSMode(w)
		}
		for _, svc := range s.Services() {
			for _, vip := range svc.VIPs {
				if got, ok := s.ServiceByAddr(vip.Network, vip.Addr); !ok || got != svc {
					t.Fatalf("service %s not found by its VIP %s", svc.Key(), vip)
				}
			}
		}
	})
}
