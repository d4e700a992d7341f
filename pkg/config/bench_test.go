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
