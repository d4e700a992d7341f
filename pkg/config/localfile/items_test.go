package localfile

import (
	"fmt"
	"os"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
)

// TestDecodeItemsMatchesTree decodes block-style files item by item and as
// one tree: the two must agree.
func TestDecodeItemsMatchesTree(t *testing.T) {
	example, err := os.ReadFile("../testdata/local-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		in   string
	}{
		{"example", string(example)},
		{"ztunnel", ztunnelShaped},
		{"anchor inside an item", "workloads:\n- &w\n  uid: a\n  name: a\n  namespace: n\n  workloadIps: [\"1.2.3.4\"]\n  services: {n/s: &p {80: 8080}}\n  authorizationPolicies: []\n# trailing comment\nservices:\n  - name: s\n    namespace: n\n    hostname: s\n    ports: {80: 0}\n"},
		{"empty lists", "workloads: []\nservices:\npolicies: # none\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			top, ok := splitTop([]byte(tc.in))
			if !ok {
				t.Fatal("not split")
			}
			got, err, ok := decodeItems(top)
			if !ok || err != nil {
				t.Fatalf("decodeItems: ok %v, %v", ok, err)
			}
			want, err := decodeTree([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("item by item:\n%+v\nas a tree:\n%+v", got, want)
			}
		})
	}
}

// TestSplitTopFallsBack lists files Decode parses as one tree.
func TestSplitTopFallsBack(t *testing.T) {
	for _, in := range []string{
		"{workloads: []}\n",
		"workloads: [\n]\n",
		"- a\n",
		"---\nworkloads: []\n",
		"workloads: []\nworkloads: []\n",
		"x: &a [1]\n",
		"workloads:\n\t- a\n",
		"\"workloads\": []\n",
	} {
		if _, ok := splitTop([]byte(in)); ok {
			t.Errorf("splitTop(%q) split it", in)
		}
	}
}

// TestParseLargeFile parses a file of 50,000 workloads backing 10,000
// services (1.4 million YAML nodes), which the former whole-tree decoder
// refused (more than 2^20 nodes). tests/scale parses the 100,000-workload
// file of issue 18 and measures its peak heap.
func TestParseLargeFile(t *testing.T) {
	if testing.Short() {
		t.Skip("a 12 MB file; skipped with -short")
	}
	const nw, ns = 50_000, 10_000
	data := largeFile(nw, ns)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	s, err := Parse(data, config.Options{Node: "none"})
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if s.NumWorkloads() != nw || s.NumServices() != ns {
		t.Fatalf("%d workloads, %d services", s.NumWorkloads(), s.NumServices())
	}
	t.Logf("%.1f MB file: parsed and validated in %s; %.0f MB allocated in all", float64(len(data))/1e6, took, float64(after.TotalAlloc-before.TotalAlloc)/1e6)
}

// largeFile generates a file of nw workloads, each backing one of ns services.
func largeFile(nw, ns int) []byte {
	var b strings.Builder
	b.WriteString("# generated\nservices:\n")
	for j := range ns {
		fmt.Fprintf(&b, "- name: s%d\n  namespace: ns-%d\n  hostname: s%d.ns-%d.svc.cluster.local\n  vips: [\"/172.%d.%d.%d\"]\n  ports: {80: 8080, 443: 8443}\n",
			j, j%100, j, j%100, 16+j>>16, byte(j>>8), byte(j))
	}
	b.WriteString("workloads:\n")
	for i := range nw {
		j := i % ns
		fmt.Fprintf(&b, "- uid: Kubernetes//Pod/ns-%d/w-%d\n  name: w-%d\n  namespace: ns-%d\n  serviceAccount: sa\n  node: node-%d\n  protocol: HBONE\n  workloadIps: [\"10.%d.%d.%d\"]\n  services:\n    ns-%d/s%d.ns-%d.svc.cluster.local: {80: 8080}\n",
			j%100, i, i, j%100, i%1000, byte(i>>16), byte(i>>8), byte(i), j%100, j, j%100)
	}
	return []byte(b.String())
}

func BenchmarkDecode5k(b *testing.B) {
	data := largeFile(5000, 1000)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(data); err != nil {
			b.Fatal(err)
		}
	}
}
