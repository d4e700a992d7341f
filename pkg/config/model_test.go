package config

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"unsafe"
)

// TestWorkloadSize keeps Workload within the 256-byte size class: a mesh
// holds one per pod in every agent (issue 18: 100,000 of them).
func TestWorkloadSize(t *testing.T) {
	if n := unsafe.Sizeof(Workload{}); n > 256 {
		t.Errorf("Workload is %d bytes, want ≤ 256 (move rarely set fields into WorkloadMeta or LocalPaths)", n)
	}
}

// TestWorkloadJSON pins the JSON form of a Workload (/config_dump,
// `inspect config`): the flat object of the struct before WorkloadMeta,
// Locality and LocalPaths moved out of it. The expected strings were
// produced by encoding/json on that struct.
func TestWorkloadJSON(t *testing.T) {
	full := &Workload{UID: "c//v1/Pod/ns/a", Name: "a", Namespace: "ns", TrustDomain: "td", ServiceAccount: "sa",
		Network: "net", WorkloadIPs: []netip.Addr{netip.MustParseAddr("198.18.0.1")}, Protocol: ProtocolHBONE, Node: "n1",
		Services: map[NamespacedHostname]PortMap{{Namespace: "ns", Hostname: "s.ns"}: {80: 8080}}, Capacity: 2,
		Status: Healthy, AuthorizationPolicies: []string{"ns/p"}, MTLSMode: MTLSStrict,
		Paths:    &LocalPaths{NetnsPath: "/run/netns/a", CgroupPath: "/sys/fs/cgroup/a"},
		Waypoint: &Waypoint{Address: NetworkAddress{Addr: netip.MustParseAddr("198.18.0.9")}, HBONEPort: 15008}}
	full.SetMeta(WorkloadMeta{ClusterID: "c", WorkloadName: "app", WorkloadType: "deployment", CanonicalName: "app", CanonicalRevision: "v1"})
	full.SetLocality(Locality{Region: "r", Zone: "z", Subzone: "s"})
	for _, tc := range []struct {
		name string
		w    *Workload
		want string
	}{
		{"every field", full, `{"UID":"c//v1/Pod/ns/a","Name":"a","Namespace":"ns","TrustDomain":"td","ServiceAccount":"sa","Network":"net","WorkloadIPs":["198.18.0.1"],"Protocol":"HBONE","Node":"n1","ClusterID":"c","WorkloadName":"app","WorkloadType":"deployment","CanonicalName":"app","CanonicalRevision":"v1","Services":{"ns/s.ns":{"80":8080}},"Capacity":2,"Locality":{"Region":"r","Zone":"z","Subzone":"s"},"Status":"Healthy","AuthorizationPolicies":["ns/p"],"MTLSMode":"STRICT","NetnsPath":"/run/netns/a","CgroupPath":"/sys/fs/cgroup/a","Waypoint":{"Address":{"Network":"","Addr":"198.18.0.9"},"Service":"/","HBONEPort":15008}}`},
		{"zero meta, locality and paths", &Workload{UID: "u", Name: "b"}, `{"UID":"u","Name":"b","Namespace":"","TrustDomain":"","ServiceAccount":"","Network":"","WorkloadIPs":null,"Protocol":"","Node":"","ClusterID":"","WorkloadName":"","WorkloadType":"","CanonicalName":"","CanonicalRevision":"","Services":null,"Capacity":0,"Locality":{"Region":"","Zone":"","Subzone":""},"Status":"","AuthorizationPolicies":null,"MTLSMode":"","NetnsPath":"","CgroupPath":""}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, v := range []any{tc.w, *tc.w, []Workload{*tc.w}} {
				b, err := json.Marshal(v)
				if err != nil {
					t.Fatal(err)
				}
				want := tc.want
				if _, ok := v.([]Workload); ok {
					want = "[" + want + "]"
				}
				if string(b) != want {
					t.Errorf("%T:\n got %s\nwant %s", v, b, want)
				}
			}
			// Round trip (without the waypoint: an address-only Waypoint
			// encodes its Service as "/", which does not parse back).
			in := *tc.w
			in.Waypoint = nil
			b, err := json.Marshal(&in)
			if err != nil {
				t.Fatal(err)
			}
			var back Workload
			if err := json.Unmarshal(b, &back); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, in) {
				t.Errorf("round trip: got %+v, want %+v", back, in)
			}
		})
	}
}

// TestWorkloadAccessors: unset meta, locality and paths read as zero
// values; the setters replace what copies share instead of modifying it.
func TestWorkloadAccessors(t *testing.T) {
	var w Workload
	if w.Meta() != (WorkloadMeta{}) || w.Locality() != (Locality{}) || w.NetnsPath() != "" || w.CgroupPath() != "" || w.ClusterID() != "" {
		t.Fatalf("zero workload: %+v %+v %q %q", w.Meta(), w.Locality(), w.NetnsPath(), w.CgroupPath())
	}
	w.SetNetnsPath("/run/netns/a")
	c := w
	c.SetCgroupPath("/sys/fs/cgroup/a")
	if w.CgroupPath() != "" || c.NetnsPath() != "/run/netns/a" || c.CgroupPath() != "/sys/fs/cgroup/a" {
		t.Errorf("copy's cgroup leaked into the original: %+v %+v", w.Paths, c.Paths)
	}
	c.SetPaths("", "")
	if c.Paths != nil || w.NetnsPath() != "/run/netns/a" {
		t.Errorf("cleared paths: %+v, original %+v", c.Paths, w.Paths)
	}
	a, b := Workload{}, Workload{}
	a.SetMeta(WorkloadMeta{WorkloadName: string([]byte("app"))})
	b.SetMeta(WorkloadMeta{WorkloadName: "app"})
	if a.meta != b.meta {
		t.Error("equal WorkloadMetas are not one interned value")
	}
	a.SetMeta(WorkloadMeta{})
	if a.meta != (Workload{}).meta || !reflect.DeepEqual(a, Workload{}) {
		t.Error("SetMeta of the zero WorkloadMeta is not the zero handle")
	}
}
