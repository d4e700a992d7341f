package xds

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi"
)

func TestConvertWorkload(t *testing.T) {
	base := func() *workloadapi.Workload {
		return &workloadapi.Workload{Uid: "c//Pod/ns/a", Name: "a", Namespace: "ns", Addresses: [][]byte{{10, 0, 0, 1}},
			TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Node: "n1", TrustDomain: "td", ServiceAccount: "sa", Network: "net",
			ClusterId: "c", WorkloadType: workloadapi.WorkloadType_POD, WorkloadName: "a", CanonicalName: "app", CanonicalRevision: "v1",
			Locality: &workloadapi.Locality{Region: "r", Zone: "z", Subzone: "s"}, Capacity: wrapperspb.UInt32(3),
			Status:                workloadapi.WorkloadStatus_UNHEALTHY,
			Services:              map[string]*workloadapi.PortList{"ns/svc.ns.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
			AuthorizationPolicies: []string{"ns/p"}}
	}
	w, notes, err := convertWorkload(base())
	if err != nil || len(notes) != 0 {
		t.Fatalf("base: %v %v", err, notes)
	}
	want := config.Workload{UID: "c//Pod/ns/a", Name: "a", Namespace: "ns", TrustDomain: "td", ServiceAccount: "sa", Network: "net",
		Protocol: config.ProtocolHBONE, Node: "n1", Capacity: 3, Status: config.Unhealthy}
	want.SetMeta(config.WorkloadMeta{ClusterID: "c", WorkloadName: "a", WorkloadType: "pod", CanonicalName: "app", CanonicalRevision: "v1"})
	want.SetLocality(config.Locality{Region: "r", Zone: "z", Subzone: "s"})
	if w.UID != want.UID || w.Protocol != want.Protocol || w.Capacity != 3 || w.Status != want.Status || w.Locality() != want.Locality() ||
		w.Meta() != want.Meta() ||
		w.WorkloadType() != "pod" || w.Network != "net" || w.TrustDomain != "td" || w.WorkloadIPs[0].String() != "10.0.0.1" ||
		w.Services[config.NamespacedHostname{Namespace: "ns", Hostname: "svc.ns.svc.cluster.local"}][80] != 8080 || w.AuthorizationPolicies[0] != "ns/p" {
		t.Fatalf("got %+v", w)
	}
	for _, tc := range []struct {
		name    string
		mutate  func(w *workloadapi.Workload)
		wantErr string
		note    string
	}{
		{"no capacity means 1", func(w *workloadapi.Workload) { w.Capacity = nil }, "", ""},
		{"ipv4-mapped address unmapped", func(w *workloadapi.Workload) {
			w.Addresses = [][]byte{{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1}}
		}, "", ""},
		{"bad address", func(w *workloadapi.Workload) { w.Addresses = [][]byte{{1}} }, "addresses[0]", ""},
		{"hostname only", func(w *workloadapi.Workload) { w.Addresses = nil; w.Hostname = "x.example" }, "no addresses", ""},
		{"sidecar", func(w *workloadapi.Workload) { w.TunnelProtocol = workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS }, "LEGACY_ISTIO_MTLS", ""},
		{"unknown status", func(w *workloadapi.Workload) { w.Status = 9 }, "status", ""},
		{"bad service key", func(w *workloadapi.Workload) { w.Services = map[string]*workloadapi.PortList{"nokey": {}} }, "services", ""},
		{"port out of range", func(w *workloadapi.Workload) {
			w.Services["ns/svc.ns.svc.cluster.local"].Ports[0].TargetPort = 70000
		}, "out of range", ""},
		{"host network in mesh", func(w *workloadapi.Workload) { w.NetworkMode = workloadapi.NetworkMode_HOST_NETWORK }, "host-network", ""},
		{"no uid", func(w *workloadapi.Workload) { w.Uid = "" }, "uid", ""},
		{"waypoint by address", func(w *workloadapi.Workload) {
			w.Waypoint = &workloadapi.GatewayAddress{HboneMtlsPort: 15008,
				Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Network: "net", Address: []byte{10, 0, 0, 9}}}}
		}, "", ""},
		{"waypoint by hostname", func(w *workloadapi.Workload) {
			w.Waypoint = &workloadapi.GatewayAddress{
				Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "ns", Hostname: "wp.ns.svc.cluster.local"}}}
		}, "", ""},
		{"waypoint without destination", func(w *workloadapi.Workload) {
			w.Waypoint = &workloadapi.GatewayAddress{HboneMtlsPort: 15008}
		}, "waypoint: no address or hostname", ""},
		{"waypoint bad address", func(w *workloadapi.Workload) {
			w.Waypoint = &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{1}}}}
		}, "waypoint: address", ""},
		{"waypoint port out of range", func(w *workloadapi.Workload) {
			w.Waypoint = &workloadapi.GatewayAddress{HboneMtlsPort: 70000,
				Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{10, 0, 0, 9}}}}
		}, "hboneMtlsPort", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := base()
			tc.mutate(in)
			w, notes, err := convertWorkload(in)
			switch {
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("err %v, want %q", err, tc.wantErr)
			case tc.wantErr == "" && err != nil:
				t.Fatal(err)
			case tc.note != "" && (len(notes) != 1 || !strings.Contains(notes[0], tc.note)):
				t.Fatalf("notes %v, want %q", notes, tc.note)
			}
			if tc.name == "no capacity means 1" && w.Capacity != 1 {
				t.Errorf("capacity %d", w.Capacity)
			}
			if tc.name == "ipv4-mapped address unmapped" && w.WorkloadIPs[0].String() != "10.0.0.1" {
				t.Errorf("address %s", w.WorkloadIPs[0])
			}
			if tc.name == "waypoint by address" && (w.Waypoint == nil || w.Waypoint.String() != "net/10.0.0.9:15008") {
				t.Errorf("waypoint %+v", w.Waypoint)
			}
			if tc.name == "waypoint by hostname" && (w.Waypoint == nil || w.Waypoint.String() != "ns/wp.ns.svc.cluster.local:15008" || w.Waypoint.HBONEPort != 0) {
				t.Errorf("waypoint %+v", w.Waypoint)
			}
		})
	}
}

func TestConvertService(t *testing.T) {
	l32, l24 := uint32(32), uint32(24)
	for _, tc := range []struct {
		name    string
		in      *workloadapi.Service
		wantErr string
		vips    int
		note    string
	}{
		{"ok", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "s.ns.svc.cluster.local", SubjectAltNames: []string{"spiffe://td/ns/ns/sa/x"},
			Addresses: []*workloadapi.NetworkAddress{{Address: []byte{198, 18, 0, 1}, Length: &l32}, {Network: "n2", Address: []byte{198, 18, 0, 2}}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}, {ServicePort: 443}}}, "", 2, ""},
		{"cidr VIP left out", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h",
			Addresses: []*workloadapi.NetworkAddress{{Address: []byte{198, 18, 0, 0}, Length: &l24}},
			Ports:     []*workloadapi.Port{{ServicePort: 80}}}, "", 0, "prefix /24"},
		{"no ports", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h"}, "no ports", 0, ""},
		{"bad VIP", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Addresses: []*workloadapi.NetworkAddress{{Address: []byte{1, 2}}},
			Ports: []*workloadapi.Port{{ServicePort: 80}}}, "addresses[0]", 0, ""},
		{"no hostname", &workloadapi.Service{Name: "s", Namespace: "ns", Ports: []*workloadapi.Port{{ServicePort: 80}}}, "hostname", 0, ""},
		{"waypoint", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			Waypoint: &workloadapi.GatewayAddress{HboneMtlsPort: 15009,
				Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{198, 18, 0, 9}}}}}, "", 0, ""},
		{"waypoint without destination", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			Waypoint: &workloadapi.GatewayAddress{}}, "waypoint: no address", 0, ""},
		{"weighted waypoints", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			WeightedWaypoints: []*workloadapi.WeightedWaypoint{{Weight: 1}}}, "weightedWaypoints", 0, ""},
		{"port 0", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 0}}}, "out of range", 0, ""},
		{"load balancing", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			LoadBalancing: &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_STRICT, HealthPolicy: workloadapi.LoadBalancing_ALLOW_ALL,
				RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_NODE}}}, "", 0, ""},
		{"load balancing passthrough", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			LoadBalancing: &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_PASSTHROUGH}}, "", 0, "PASSTHROUGH"},
		{"unknown load balancing mode", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			LoadBalancing: &workloadapi.LoadBalancing{Mode: 42}}, "loadBalancing: unknown mode", 0, ""},
		{"unknown routing scope", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			LoadBalancing: &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{99}}}, "routing preference scope", 0, ""},
		{"unknown health policy", &workloadapi.Service{Name: "s", Namespace: "ns", Hostname: "h", Ports: []*workloadapi.Port{{ServicePort: 80}},
			LoadBalancing: &workloadapi.LoadBalancing{HealthPolicy: 7}}, "health policy", 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, notes, err := convertService(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.name == "waypoint" && (s.Waypoint == nil || s.Waypoint.String() != "/198.18.0.9:15009") {
				t.Errorf("waypoint %+v", s.Waypoint)
			}
			if tc.name == "load balancing" {
				lb := s.LoadBalancing
				if lb == nil || lb.Mode != config.LBStrict || !lb.AllowUnhealthy || len(lb.RoutingPreference) != 2 ||
					lb.RoutingPreference[0] != config.ScopeNetwork || lb.RoutingPreference[1] != config.ScopeNode || len(notes) != 0 {
					t.Errorf("load balancing %+v, notes %v", lb, notes)
				}
			}
			if len(s.VIPs) != tc.vips {
				t.Errorf("VIPs %v, want %d", s.VIPs, tc.vips)
			}
			if tc.note != "" && (len(notes) != 1 || !strings.Contains(notes[0], tc.note)) {
				t.Errorf("notes %v, want %q", notes, tc.note)
			}
		})
	}
}
