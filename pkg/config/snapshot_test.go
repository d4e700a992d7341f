package config

import (
	"errors"
	"io/fs"
	"net/netip"
	"strings"
	"testing"
	"unsafe"
)

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

var svcKey = NamespacedHostname{Namespace: "default", Hostname: "echo.default.svc.cluster.local"}

func validConfig() Config {
	return Config{
		Services: []*Service{{
			Name: "echo", Namespace: "default", Hostname: svcKey.Hostname,
			VIPs:            []NetworkAddress{{Addr: netip.MustParseAddr("198.18.100.1")}},
			Ports:           PortMap{80: 8080},
			SubjectAltNames: []string{"spiffe://cluster.local/ns/default/sa/echo", "spiffe://cluster.local/ns/default/sa/default"},
		}},
		Policies: []*AuthorizationPolicy{
			{Name: "ns", Namespace: "default", Scope: ScopeNamespace, Action: ActionAllow},
			{Name: "all", Namespace: "istio-system", Scope: ScopeGlobal, Action: ActionDeny},
			{Name: "sel", Namespace: "default", Scope: ScopeWorkloadSelector, Action: ActionAllow},
			{Name: "other", Namespace: "other", Scope: ScopeNamespace, Action: ActionAllow},
		},
		PeerAuthentications: []*PeerAuthentication{
			{Name: "mesh", Namespace: "istio-system", Scope: ScopeGlobal, Mode: MTLSPermissive},
			{Name: "strict", Namespace: "secure", Scope: ScopeNamespace, Mode: MTLSStrict},
		},
		Workloads: []*Workload{
			{
				UID: "c//v1/Pod/default/b", Name: "b", Namespace: "default", Node: "node-a",
				WorkloadIPs: addrs("198.18.1.2"), Protocol: ProtocolHBONE, Paths: &LocalPaths{NetnsPath: "/run/netns/b"},
				Services: map[NamespacedHostname]PortMap{svcKey: {80: 8080}}, Capacity: 1,
				AuthorizationPolicies: []string{"default/sel"},
			},
			{
				UID: "c//v1/Pod/default/a", Name: "a", Namespace: "default", Node: "node-a",
				WorkloadIPs: addrs("198.18.1.1", "2001:2::1"), Paths: &LocalPaths{NetnsPath: "/run/netns/a"},
				Services: map[NamespacedHostname]PortMap{svcKey: {80: 0}}, Capacity: 1,
			},
			{
				UID: "c//v1/Pod/secure/c", Name: "c", Namespace: "secure", Node: "node-b",
				WorkloadIPs: addrs("198.18.2.1"), Protocol: ProtocolHBONE, MTLSMode: MTLSPermissive,
			},
			{
				UID: "c//v1/Pod/secure/d", Name: "d", Namespace: "secure", Node: "node-b", Network: "net2",
				WorkloadIPs: addrs("198.18.1.1"), Protocol: ProtocolHBONE,
			},
		},
	}
}

func okPath(string) error { return nil }

func TestSnapshotLookups(t *testing.T) {
	s, err := NewSnapshot(validConfig(), Options{Node: "node-a", CheckNetns: okPath, CheckCgroup: okPath})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(s.Workloads()); got != 4 {
		t.Fatalf("workloads = %d", got)
	}
	if s.Workloads()[0].UID != "c//v1/Pod/default/a" {
		t.Errorf("workloads not sorted by uid: %v", s.Workloads()[0].UID)
	}
	a, ok := s.WorkloadByIP("", netip.MustParseAddr("::ffff:198.18.1.1"))
	if !ok || a.Name != "a" {
		t.Fatalf("WorkloadByIP mapped v4 = %v %v", a, ok)
	}
	if a.Protocol != ProtocolTCP || a.Status != Healthy {
		t.Errorf("defaults not applied: %s %s", a.Protocol, a.Status)
	}
	if w, ok := s.WorkloadByIP("net2", netip.MustParseAddr("198.18.1.1")); !ok || w.Name != "d" {
		t.Errorf("WorkloadByIP other network = %v %v", w, ok)
	}
	if w, ok := s.WorkloadByIP("", netip.MustParseAddr("2001:2::1")); !ok || w.Name != "a" {
		t.Errorf("WorkloadByIP v6 = %v %v", w, ok)
	}
	if _, ok := s.WorkloadByIP("", netip.MustParseAddr("198.18.9.9")); ok {
		t.Error("unknown IP found")
	}
	svc, ok := s.ServiceByVIP("", netip.MustParseAddrPort("198.18.100.1:80"))
	if !ok || svc.Name != "echo" {
		t.Fatalf("ServiceByVIP = %v %v", svc, ok)
	}
	if _, ok := s.ServiceByVIP("", netip.MustParseAddrPort("198.18.100.1:81")); ok {
		t.Error("ServiceByVIP matched a port the service does not expose")
	}
	if _, ok := s.ServiceByAddr("", netip.MustParseAddr("198.18.100.1")); !ok {
		t.Error("ServiceByAddr missed the VIP")
	}
	eps := s.Endpoints(svc)
	if len(eps) != 2 || eps[0].Workload.Name != "a" || eps[1].Workload.Name != "b" {
		t.Fatalf("endpoints = %+v", eps)
	}
	if p, ok := eps[0].TargetPort(80); !ok || p != 8080 {
		t.Errorf("target port via service = %d %v", p, ok)
	}
	if got := eps[0].ExpectedIdentities(); len(got) != 2 || got[0] != "spiffe://cluster.local/ns/default/sa/default" || got[1] != "spiffe://cluster.local/ns/default/sa/echo" {
		t.Errorf("expected identities = %v", got)
	}
	if _, ok := eps[0].TargetPort(81); ok {
		t.Error("target port for unknown service port")
	}
	if got := len(s.LocalWorkloads()); got != 2 {
		t.Errorf("local workloads = %d", got)
	}
	if got := s.EnrolledWorkloads(); len(got) != 1 || got[0].Name != "b" {
		t.Errorf("enrolled workloads = %v", got)
	}
	if got := len(s.WorkloadsOnNode("node-b")); got != 2 {
		t.Errorf("node-b workloads = %d", got)
	}
	b, _ := s.WorkloadByUID("c//v1/Pod/default/b")
	var keys []string
	for _, p := range s.PoliciesFor(b) {
		keys = append(keys, p.Key())
	}
	if got := strings.Join(keys, ","); got != "istio-system/all,default/ns,default/sel" {
		t.Errorf("PoliciesFor(b) = %s", got)
	}
	if got := b.Identity(); got != "spiffe://cluster.local/ns/default/sa/default" {
		t.Errorf("identity = %s", got)
	}
	c, _ := s.WorkloadByUID("c//v1/Pod/secure/c")
	d, _ := s.WorkloadByUID("c//v1/Pod/secure/d")
	for _, tc := range []struct {
		w    *Workload
		want MTLSMode
	}{{a, MTLSPermissive}, {c, MTLSPermissive}, {d, MTLSStrict}} {
		if got := s.MTLSMode(tc.w); got != tc.want {
			t.Errorf("MTLSMode(%s) = %s, want %s", tc.w.Name, got, tc.want)
		}
	}
	if got := Empty("x").MTLSMode(a); got != MTLSPermissive {
		t.Errorf("default mode = %s", got)
	}
}

func TestSnapshotValidation(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(c *Config)
		check  func(string) error
		want   string
	}{
		{"duplicate uid", func(c *Config) { c.Workloads[1].UID = c.Workloads[0].UID }, nil,
			`workloads[1] (uid "c//v1/Pod/default/b"): duplicate uid`},
		{"duplicate ip", func(c *Config) { c.Workloads[2].WorkloadIPs = addrs("198.18.1.2") }, nil,
			`workloads[2] (uid "c//v1/Pod/secure/c"): workloadIps[0]: duplicate IP 198.18.1.2 (network "") also used by workload "c//v1/Pod/default/b"`},
		{"duplicate ip mapped", func(c *Config) { c.Workloads[2].WorkloadIPs = addrs("::ffff:198.18.1.2") }, nil,
			`duplicate IP 198.18.1.2`},
		{"ip is a vip", func(c *Config) { c.Workloads[2].WorkloadIPs = addrs("198.18.100.1") }, nil,
			`workloadIps[0]: 198.18.100.1 is a VIP of service default/echo.default.svc.cluster.local`},
		{"no ip", func(c *Config) { c.Workloads[2].WorkloadIPs = nil }, nil,
			`workloadIps: at least one address is required`},
		{"bad protocol", func(c *Config) { c.Workloads[0].Protocol = "HTTP" }, nil,
			`protocol: unknown value "HTTP" (want HBONE or TCP)`},
		{"bad status", func(c *Config) { c.Workloads[0].Status = "Sick" }, nil,
			`status: unknown value "Sick"`},
		{"bad mtls", func(c *Config) { c.Workloads[0].MTLSMode = "DISABLE" }, nil,
			`mtlsMode: unknown value "DISABLE"`},
		{"local without netns", func(c *Config) { c.Workloads[0].SetNetnsPath("") }, nil,
			`workloads[0] (uid "c//v1/Pod/default/b"): netnsPath is required for a mesh (HBONE) workload on this node (node-a)`},
		{"relative netns", func(c *Config) { c.Workloads[1].SetNetnsPath("netns/a") }, nil,
			`netnsPath "netns/a" must be absolute`},
		{"missing netns", func(c *Config) {}, func(p string) error {
			if p == "/run/netns/a" {
				return fs.ErrNotExist
			}
			return nil
		}, `workloads[1] (uid "c//v1/Pod/default/a"): netnsPath: network namespace of workload a is not usable: file does not exist`},
		{"shared netns", func(c *Config) { c.Workloads[1].SetNetnsPath("/run/netns/b") }, nil,
			`netnsPath "/run/netns/b" is also used by workload "c//v1/Pod/default/b"`},
		{"missing cgroup", func(c *Config) { c.Workloads[1].SetCgroupPath("/sys/fs/cgroup/x") }, func(p string) error {
			if strings.HasPrefix(p, "/sys") {
				return fs.ErrNotExist
			}
			return nil
		}, `cgroupPath: cgroup of workload a is not usable`},
		{"unknown service", func(c *Config) {
			c.Workloads[0].Services = map[NamespacedHostname]PortMap{{Namespace: "x", Hostname: "y"}: nil}
		}, nil, `services: service x/y is not defined in services`},
		{"unknown policy ref", func(c *Config) { c.Workloads[0].AuthorizationPolicies = []string{"default/nope"} }, nil,
			`authorizationPolicies[0]: policy "default/nope" is not defined in policies`},
		{"policy ref wrong scope", func(c *Config) { c.Workloads[0].AuthorizationPolicies = []string{"default/ns"} }, nil,
			`policy "default/ns" has scope Namespace, not WorkloadSelector`},
		{"duplicate vip", func(c *Config) {
			c.Services = append(c.Services, &Service{Name: "e2", Namespace: "default", Hostname: "e2", Ports: PortMap{1: 1},
				VIPs: []NetworkAddress{{Addr: netip.MustParseAddr("198.18.100.1")}}})
		}, nil, `services[1] (default/e2): vips[0]: /198.18.100.1 is also a VIP of service default/echo.default.svc.cluster.local`},
		{"duplicate service", func(c *Config) {
			c.Services = append(c.Services, &Service{Name: "e2", Namespace: "default", Hostname: svcKey.Hostname, Ports: PortMap{1: 1}})
		}, nil, `services[1] (default/echo.default.svc.cluster.local): duplicate service`},
		{"service without ports", func(c *Config) { c.Services[0].Ports = nil }, nil, `ports: at least one port is required`},
		{"bad scope", func(c *Config) { c.Policies[0].Scope = "Cluster" }, nil,
			`policies[0] (default/ns): scope: unknown value "Cluster"`},
		{"bad action", func(c *Config) { c.Policies[0].Action = "Audit" }, nil,
			`policies[0] (default/ns): action: unknown value "Audit" (want Allow or Deny)`},
		{"duplicate policy", func(c *Config) { c.Policies[1].Name, c.Policies[1].Namespace = "ns", "default" }, nil,
			`policies[1] (default/ns): duplicate policy default/ns`},
		{"port zero", func(c *Config) { c.Policies[0].Rules = []Rule{{{{DestinationPorts: []uint16{0}}}}} }, nil,
			`policies[0] (default/ns): rules[0][0][0]: destination port 0 is invalid`},
		{"two global modes", func(c *Config) {
			c.PeerAuthentications = append(c.PeerAuthentications, &PeerAuthentication{Name: "x", Scope: ScopeGlobal, Mode: MTLSStrict})
		}, nil, `peerAuthentications[2] (/x): a second Global peer authentication`},
		{"bad mode", func(c *Config) { c.PeerAuthentications[0].Mode = "OFF" }, nil,
			`mode: unknown value "OFF" (want STRICT or PERMISSIVE)`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.mutate(&c)
			check := tc.check
			if check == nil {
				check = okPath
			}
			_, err := NewSnapshot(c, Options{Node: "node-a", CheckNetns: check, CheckCgroup: check})
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q\ndoes not contain %q", err, tc.want)
			}
		})
	}
}

func TestSnapshotLocalOutsideMesh(t *testing.T) {
	c := Config{Workloads: []*Workload{{UID: "tcp", Name: "tcp", Namespace: "n", Node: "me", Protocol: ProtocolTCP, WorkloadIPs: addrs("198.18.1.1")}}}
	s, err := NewSnapshot(c, Options{Node: "me"})
	if err != nil {
		t.Fatalf("a local workload outside the mesh needs no netns: %v", err)
	}
	if len(s.LocalWorkloads()) != 1 || len(s.EnrolledWorkloads()) != 0 {
		t.Errorf("local %d enrolled %d", len(s.LocalWorkloads()), len(s.EnrolledWorkloads()))
	}
	c.Workloads[0].SetNetnsPath("/proc/self/ns/nope")
	if _, err := NewSnapshot(c, Options{Node: "me"}); err == nil {
		t.Error("a netnsPath that is set is checked even outside the mesh")
	}
}

func TestSnapshotErrorsAreBounded(t *testing.T) {
	var c Config
	for range 50 {
		c.Workloads = append(c.Workloads, &Workload{})
	}
	_, err := NewSnapshot(c, Options{})
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) || len(joined.Unwrap()) != maxErrors+1 {
		t.Fatalf("want %d joined errors, got %v", maxErrors+1, err)
	}
	if !strings.Contains(err.Error(), "and 30 more problems") {
		t.Errorf("missing overflow note: %v", err)
	}
}

func TestParseNetworkAddress(t *testing.T) {
	cases := []struct {
		in      string
		want    NetworkAddress
		wantErr bool
	}{
		{"/10.0.0.1", NetworkAddress{Addr: netip.MustParseAddr("10.0.0.1")}, false},
		{"remote/2001:2::1", NetworkAddress{Network: "remote", Addr: netip.MustParseAddr("2001:2::1")}, false},
		{"10.0.0.1", NetworkAddress{Addr: netip.MustParseAddr("10.0.0.1")}, false},
		{"net/10.0.0.300", NetworkAddress{}, true},
		{"net/", NetworkAddress{}, true},
	}
	for _, tc := range cases {
		got, err := ParseNetworkAddress(tc.in)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("ParseNetworkAddress(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// TestWorkloadNameInUID: a name that ends the UID is held as a slice of it
// (one string per workload), and a name that does not is kept as given.
func TestWorkloadNameInUID(t *testing.T) {
	a := &Workload{UID: "c//Pod/ns/" + strings.Repeat("x", 3), Name: strings.Repeat("x", 3), Namespace: "ns", WorkloadIPs: []netip.Addr{netip.MustParseAddr("198.18.0.1")}}
	b := &Workload{UID: "c//Pod/ns/yx", Name: "x", Namespace: "ns", WorkloadIPs: []netip.Addr{netip.MustParseAddr("198.18.0.2")}}
	s, err := NewSnapshot(Config{Workloads: []*Workload{a, b}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	wa, _ := s.WorkloadByUID(a.UID)
	if wa.Name != "xxx" || unsafe.StringData(wa.Name) != unsafe.StringData(wa.UID[len(wa.UID)-3:]) {
		t.Errorf("name %q is not the end of its UID's memory", wa.Name)
	}
	if wb, _ := s.WorkloadByUID(b.UID); wb.Name != "x" {
		t.Errorf("name %q, want x", wb.Name)
	}
}

// TestWorkloadByIPNetworks: the by-IP index keeps addresses of the default
// network and of other networks apart, finds IPv4-mapped forms, and forgets
// a removed workload's addresses only in its own network.
func TestWorkloadByIPNetworks(t *testing.T) {
	v4, v6 := netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("2001:2::1")
	a := &Workload{UID: "a", Name: "a", Namespace: "ns", WorkloadIPs: []netip.Addr{v4, v6}}
	b := &Workload{UID: "b", Name: "b", Namespace: "ns", Network: "net2", WorkloadIPs: []netip.Addr{v4}}
	s, err := NewSnapshot(Config{Workloads: []*Workload{a, b}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		network string
		ip      netip.Addr
		want    string
	}{
		{"", v4, "a"}, {"", netip.AddrFrom16(v4.As16()), "a"}, {"", v6, "a"}, {"net2", v4, "b"}, {"net2", v6, ""},
		{"", netip.MustParseAddr("198.18.0.2"), ""},
	} {
		got := ""
		if w, ok := s.WorkloadByIP(tc.network, tc.ip); ok {
			got = w.UID
		}
		if got != tc.want {
			t.Errorf("WorkloadByIP(%q, %s) = %q, want %q", tc.network, tc.ip, got, tc.want)
		}
	}
	s2, rej := s.Apply(Delta{RemovedWorkloads: []string{"a"}})
	if len(rej) > 0 {
		t.Fatal(rej)
	}
	if _, ok := s2.WorkloadByIP("", v4); ok {
		t.Error("a's address still found after its removal")
	}
	if w, ok := s2.WorkloadByIP("net2", v4); !ok || w.UID != "b" {
		t.Error("b's address in net2 lost with a's removal")
	}
	if _, ok := s.WorkloadByIP("", v4); !ok {
		t.Error("the parent snapshot lost a's address")
	}
}
