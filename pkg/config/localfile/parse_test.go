package localfile

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
)

func okPath(string) error { return nil }

func TestParseExample(t *testing.T) {
	data, err := os.ReadFile("../testdata/local-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s, err := Parse(data, config.Options{Node: "node-a", CheckNetns: okPath, CheckCgroup: okPath})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(s.Workloads()); got != 5 {
		t.Fatalf("workloads = %d", got)
	}
	if got := len(s.LocalWorkloads()); got != 2 {
		t.Errorf("local workloads = %d", got)
	}
	c, ok := s.WorkloadByIP("", netip.MustParseAddr("2001:2:0:1::10"))
	if !ok || c.Name != "client-a" || c.Protocol != config.ProtocolHBONE || c.Capacity != 1 ||
		c.Locality() != (config.Locality{Region: "eu", Zone: "eu-1", Subzone: "rack1"}) ||
		c.NetnsPath() != "/run/netns/client-a" || c.CgroupPath() != "/sys/fs/cgroup/warren/client-a" {
		t.Errorf("client-a = %+v", c)
	}
	svc, ok := s.ServiceByVIP("", netip.MustParseAddrPort("[2001:2:0:100::1]:80"))
	if !ok || svc.Name != "echo" || svc.SubjectAltNames[0] != "spiffe://cluster.local/ns/default/sa/server" {
		t.Fatalf("service = %+v %v", svc, ok)
	}
	eps := s.Endpoints(svc)
	if len(eps) != 3 {
		t.Fatalf("endpoints = %d", len(eps))
	}
	if eps[2].Workload.Status != config.Unhealthy || eps[0].Workload.Capacity != 90 {
		t.Errorf("endpoint fields: %+v %+v", eps[0].Workload, eps[2].Workload)
	}
	if p, _ := eps[2].TargetPort(80); p != 8080 {
		t.Errorf("target port 0 falls back to service: %d", p)
	}
	srv, _ := s.WorkloadByUID("lab//v1/Pod/default/server-a")
	var keys []string
	for _, p := range s.PoliciesFor(srv) {
		keys = append(keys, p.Key())
	}
	if got := strings.Join(keys, ","); got != "istio-system/deny-legacy,default/allow-default,default/server-ports" {
		t.Errorf("policies for server-a = %s", got)
	}
	allow, _ := s.Policy("default/allow-default")
	clause := allow.Rules[0][0]
	if len(clause) != 2 || clause[0].Principals[0] != (config.StringMatch{Kind: config.MatchPrefix, Value: "cluster.local/ns/default/sa/"}) ||
		clause[1].Namespaces[0] != (config.StringMatch{Kind: config.MatchExact, Value: "monitoring"}) ||
		clause[1].SourceIPs[0] != netip.MustParsePrefix("198.18.0.0/15") {
		t.Errorf("allow-default rules = %+v", allow.Rules)
	}
	plain, _ := s.WorkloadByUID("lab//v1/Pod/legacy/plain")
	if s.MTLSMode(plain) != config.MTLSPermissive || s.MTLSMode(srv) != config.MTLSStrict {
		t.Errorf("mtls modes: plain %s server %s", s.MTLSMode(plain), s.MTLSMode(srv))
	}
}

// ztunnelShaped follows the keys and forms of ztunnel's examples/localhost.yaml
// (empty network, "/ip" and "network/ip" VIPs, canonical, nested rules, dryRun).
const ztunnelShaped = `
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
          principals:
          - Suffix: /sa/default
          - Presence: {}
          - Prefix: spiffe://cluster.local/
    name: deny-9999
    namespace: default
    scope: Namespace
    dryRun: false
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
    - remote/127.10.0.2
  ports:
    80: 8080
  subjectAltNames:
   - spiffe://cluster.local/ns/default/sa/local
  canonical: true
`

func TestParseZtunnelShape(t *testing.T) {
	s, err := Parse([]byte(ztunnelShaped), config.Options{Node: "other"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.ServiceByVIP("remote", netip.MustParseAddrPort("127.10.0.2:80")); !ok {
		t.Error("remote VIP missing")
	}
	p, _ := s.Policy("default/deny-9999")
	m := p.Rules[0][0][0]
	want := []config.StringMatch{
		{Kind: config.MatchSuffix, Value: "/sa/default"},
		{Kind: config.MatchPresence},
		{Kind: config.MatchPrefix, Value: "cluster.local/"},
	}
	if len(m.Principals) != 3 || m.Principals[0] != want[0] || m.Principals[1] != want[1] || m.Principals[2] != want[2] {
		t.Errorf("principals = %+v", m.Principals)
	}
	if m.NotDestinationPorts[0] != 9999 {
		t.Errorf("ports = %v", m.NotDestinationPorts)
	}
}

func TestParseEmpty(t *testing.T) {
	for _, in := range []string{"", "# nothing\n", "workloads: []\n"} {
		s, err := Parse([]byte(in), config.Options{Node: "n"})
		if err != nil || len(s.Workloads()) != 0 {
			t.Errorf("Parse(%q) = %v", in, err)
		}
	}
}

func TestParseErrors(t *testing.T) {
	const base = `
workloads:
- uid: u1
  name: a
  namespace: default
  workloadIps: ["198.18.1.1"]
  protocol: HBONE
  node: node-a
  netnsPath: /run/netns/a
`
	cases := []struct {
		name string
		yaml string
		want []string
	}{
		{"unknown top-level", "workload: []\n", []string{`workload: unknown field (did you mean "workloads"?)`}},
		{"unknown workload field", strings.Replace(base, "name: a", "name: a\n  servicAccount: x", 1),
			[]string{`line 5: workloads[0].servicAccount: unknown field (did you mean "serviceAccount"?)`}},
		{"unknown nested field", strings.Replace(base, "node: node-a", "node: node-a\n  locality: {region: x, zon: y}", 1),
			[]string{`workloads[0].locality.zon: unknown field (did you mean "zone"?)`}},
		{"unknown match field", `
policies:
- name: p
  namespace: n
  scope: Namespace
  action: Allow
  rules: [[[{ipBlocks: ["1.2.3.4"]}]]]
`, []string{`policies[0].rules[0][0][0].ipBlocks: unknown field`}},
		{"duplicate key", strings.Replace(base, "name: a", "name: a\n  name: b", 1), []string{`line 5: workloads[0].name: duplicate key "name"`}},
		{"bad ip", strings.Replace(base, "198.18.1.1", "198.18.1.300", 1),
			[]string{`workloads[0] (uid "u1"): workloadIps[0]: ParseAddr("198.18.1.300")`}},
		{"bad type", strings.Replace(base, "node: node-a", "node: node-a\n  capacity: lots", 1),
			[]string{`line 9: workloads[0].capacity: want int64, got string`}},
		{"negative capacity", strings.Replace(base, "node: node-a", "node: node-a\n  capacity: -1", 1),
			[]string{`capacity: -1 out of range`}},
		{"bad enum", strings.Replace(base, "protocol: HBONE", "protocol: QUIC", 1),
			[]string{`workloads[0] (uid "u1"): protocol: unknown value "QUIC"`}},
		{"no netns", strings.Replace(base, "netnsPath: /run/netns/a", "", 1),
			[]string{`workloads[0] (uid "u1"): netnsPath is required for a mesh (HBONE) workload on this node (node-a)`}},
		{"duplicate ip", base + `- uid: u2
  name: b
  namespace: default
  workloadIps: ["198.18.1.1"]
`, []string{`workloads[1] (uid "u2"): workloadIps[0]: duplicate IP 198.18.1.1 (network "") also used by workload "u1"`}},
		{"bad service key", strings.Replace(base, "node: node-a", "node: node-a\n  services: {nohost: {80: 80}}", 1),
			[]string{`services: parse "nohost": want namespace/hostname`}},
		{"bad port", `
services:
- name: s
  namespace: n
  hostname: h
  vips: ["/198.18.100.1", "net/300.1.1.1"]
  ports: {http: 80, 81: 70000}
`, []string{
			`services[0] (n/h): vips[1]: parse network address "net/300.1.1.1"`,
			`services[0] (n/h): ports: service port "http" is not a port number (1-65535)`,
			`services[0] (n/h): ports[81]: target port 70000 is not a port number`,
		}},
		{"bad policy values", `
policies:
- name: p
  namespace: n
  scope: namespace
  action: allow
  rules: [[[{sourceIps: ["10.0.0.0/33"], destinationPorts: [0], principals: [{Regex: ".*"}], namespaces: [7]}],
           [{notPrincipals: ["cluster.local/ns/*/sa/x"], serviceAccounts: [{namespace: a, serviceAccount: ""}], notNamespaces: [""]}]]]
`, []string{
			`policies[0] (n/p): rules[0][0][0].sourceIps[0]: ip block "10.0.0.0/33"`,
			`rules[0][0][0].destinationPorts[0]: port 0: want a number 1-65535`,
			`rules[0][1][0].notPrincipals[0]: pattern "cluster.local/ns/*/sa/x": "*" is allowed only alone`,
			`rules[0][1][0].serviceAccounts[0]: service account: empty name`,
			`rules[0][1][0].notNamespaces[0]: empty pattern`,
			`rules[0][0][0].principals[0]: unknown match "Regex"`,
			`rules[0][0][0].namespaces[0]: want a string or a {Exact|Prefix|Suffix|Presence: ...} map`,
		}},
		{"not a map", "- a\n- b\n", []string{"top level must be a map"}},
		{"two documents", "workloads: []\n---\nservices: []\n", []string{"exactly one YAML document"}},
		{"list expected", "workloads: {uid: x}\n", []string{"line 1: workloads: want a list"}},
		{"malformed", "workloads: [\n", []string{"decode yaml"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), config.Options{Node: "node-a", CheckNetns: okPath, CheckCgroup: okPath})
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error:\n%v\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

func TestParseNormalises(t *testing.T) {
	s, err := Parse([]byte(`
workloads:
- uid: u
  name: a
  namespace: n
  workloadIps: ["::ffff:198.18.1.1"]
policies:
- name: p
  namespace: n
  scope: GLOBAL
  action: DENY
  rules: [[[{principals: ["spiffe://td/ns/a/sa/b"], sourceIps: ["198.18.0.1", "::ffff:198.18.0.0/112"]}]]]
`), config.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.WorkloadByIP("", netip.MustParseAddr("198.18.1.1")); !ok {
		t.Error("mapped workload IP not unmapped")
	}
	p, _ := s.Policy("n/p")
	m := p.Rules[0][0][0]
	if p.Scope != config.ScopeGlobal || p.Action != config.ActionDeny {
		t.Errorf("enums not normalised: %s %s", p.Scope, p.Action)
	}
	if m.Principals[0].Value != "td/ns/a/sa/b" {
		t.Errorf("spiffe:// not stripped: %q", m.Principals[0].Value)
	}
	if m.SourceIPs[0] != netip.MustParsePrefix("198.18.0.1/32") || m.SourceIPs[1] != netip.MustParsePrefix("198.18.0.0/16") {
		t.Errorf("ip blocks = %v", m.SourceIPs)
	}
}

func TestParseKeepsYAML11BooleanWordsAsStrings(t *testing.T) {
	s, err := Parse([]byte("workloads:\n- {uid: u, name: off, namespace: no, workloadIps: [198.18.1.1], node: n}\n"), config.Options{})
	if err != nil {
		t.Fatal(err)
	}
	w, _ := s.WorkloadByUID("u")
	if w.Name != "off" || w.Namespace != "no" {
		t.Errorf("name %q namespace %q", w.Name, w.Namespace)
	}
}

func TestParseAliasBomb(t *testing.T) {
	var b strings.Builder
	b.WriteString("x0: &a0 [1, 2]\n")
	for i := 1; i < 40; i++ {
		fmt.Fprintf(&b, "x%d: &a%d [*a%d, *a%d]\n", i, i, i-1, i-1)
	}
	start := time.Now()
	_, err := Parse([]byte(b.String()), config.Options{})
	if err == nil || !strings.Contains(err.Error(), "document too large") {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %s", d)
	}
}

// TestParseReadmeExample keeps examples/local-config.yaml valid.
func TestParseReadmeExample(t *testing.T) {
	data, err := os.ReadFile("../../../examples/local-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s, err := Parse(data, config.Options{Node: "node-a", CheckNetns: okPath, CheckCgroup: okPath})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Workloads()) != 4 || len(s.LocalWorkloads()) != 1 || len(s.Services()) != 1 || len(s.Policies()) != 3 {
		t.Errorf("workloads %d local %d services %d policies %d", len(s.Workloads()), len(s.LocalWorkloads()), len(s.Services()), len(s.Policies()))
	}
	client, _ := s.WorkloadByUID("lab//v1/Pod/default/client")
	if s.MTLSMode(client) != config.MTLSStrict {
		t.Errorf("client mode %s", s.MTLSMode(client))
	}
	if len(s.Policies()[1].Rules[0]) != 2 {
		t.Errorf("allow-default rule should have a from and a to clause: %+v", s.Policies()[1].Rules)
	}
}
