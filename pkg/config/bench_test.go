package config

import (
	"fmt"
	"net/netip"
	"testing"
)

func bigConfig(n int) Config {
	svc := &Service{Name: "s", Namespace: "default", Hostname: "s", Ports: PortMap{80: 8080},
		VIPs: []NetworkAddress{{Addr: netip.MustParseAddr("198.19.255.1")}}}
	c := Config{Services: []*Service{svc}}
	for i := range n {
		c.Workloads = append(c.Workloads, &Workload{
			UID: fmt.Sprint("w", i), Name: fmt.Sprint("w", i), Namespace: "default", Node: fmt.Sprint("node-", i%100),
			Protocol:    ProtocolHBONE,
			WorkloadIPs: []netip.Addr{netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})},
			Services:    map[NamespacedHostname]PortMap{svc.Key(): nil},
		})
	}
	return c
}

func BenchmarkNewSnapshot10k(b *testing.B) {
	c := bigConfig(10000)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := NewSnapshot(c, Options{Node: "none"}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkWorkloadByIP(b *testing.B) {
	s, err := NewSnapshot(bigConfig(10000), Options{})
	if err != nil {
		b.Fatal(err)
	}
	ip := netip.MustParseAddr("198.18.10.10")
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := s.WorkloadByIP("", ip); !ok {
			b.Fatal("miss")
		}
	}
}

func BenchmarkServiceByVIP(b *testing.B) {
	s, err := NewSnapshot(bigConfig(10), Options{})
	if err != nil {
		b.Fatal(err)
	}
	vip := netip.MustParseAddrPort("198.19.255.1:80")
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := s.ServiceByVIP("", vip); !ok {
			b.Fatal("miss")
		}
	}
}

// meshConfig is n workloads, each backing one of n/5 services.
func meshConfig(n int) Config {
	var c Config
	for j := range n / 5 {
		c.Services = append(c.Services, &Service{Name: fmt.Sprint("s", j), Namespace: "default", Hostname: fmt.Sprint("s", j),
			Ports: PortMap{80: 8080}, VIPs: []NetworkAddress{{Addr: netip.AddrFrom4([4]byte{172, 16 + byte(j>>16), byte(j >> 8), byte(j)})}}})
	}
	for i := range n {
		c.Workloads = append(c.Workloads, &Workload{
			UID: fmt.Sprint("w", i), Name: fmt.Sprint("w", i), Namespace: "default", Node: fmt.Sprint("node-", i%1000),
			Protocol:    ProtocolHBONE,
			WorkloadIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})},
			Services:    map[NamespacedHostname]PortMap{c.Services[i%len(c.Services)].Key(): nil},
		})
	}
	return c
}

// BenchmarkApplyOneWorkload100k restarts one workload of a 100,000-workload
// mesh (new address): the cost of a delta, which must not grow with the mesh.
func BenchmarkApplyOneWorkload100k(b *testing.B) {
	c := meshConfig(100_000)
	s, err := NewSnapshot(c, Options{Node: "none"})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		i := n % len(c.Workloads)
		w := *c.Workloads[i]
		w.WorkloadIPs = []netip.Addr{netip.AddrFrom4([4]byte{11, byte(n >> 16), byte(n >> 8), byte(n)})}
		next, rejected := s.Apply(Delta{Workloads: []*Workload{&w}})
		if len(rejected) > 0 {
			b.Fatal(rejected)
		}
		s = next
		n++
	}
}
