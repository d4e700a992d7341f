package ztunnel

import (
	"strings"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
)

func TestTraceparent(t *testing.T) {
	h, id := newTraceparent()
	if got := parseTraceparent(h); got != id || len(id) != 32 {
		t.Fatalf("newTraceparent %q (id %q) parses to %q", h, id, got)
	}
	if h2, _ := newTraceparent(); h2 == h {
		t.Error("two connections share a traceparent")
	}
	for _, tc := range []struct{ in, want string }{
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"},
		{" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ", "4bf92f3577b34da6a3ce929d0e0e4736"},
		{"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ""}, // unknown version
		{"00-00000000000000000000000000000000-00f067aa0ba902b7-01", ""}, // zero trace ID
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", ""}, // zero span ID
		{"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", ""}, // upper case
		{"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", ""},  // short
		{"00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01", ""}, // not hex
		{"", ""},
	} {
		if got := parseTraceparent(tc.in); got != tc.want {
			t.Errorf("parseTraceparent(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestBaggage(t *testing.T) {
	for _, tc := range []struct {
		name string
		w    *config.Workload
		want string
	}{
		{"full", withMeta(&config.Workload{Name: "client-7d9-x", Namespace: "ns"}, config.WorkloadMeta{ClusterID: "Kubernetes", WorkloadType: "deployment", WorkloadName: "client",
			CanonicalName: "client", CanonicalRevision: "v1"}, config.Locality{Region: "eu", Zone: "eu-1a"}),
			"k8s.cluster.name=Kubernetes,k8s.namespace.name=ns,k8s.deployment.name=client,service.name=client,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-1a"},
		{"file-mode workload", &config.Workload{Name: "a", Namespace: "ns"}, "k8s.namespace.name=ns,k8s.pod.name=a"},
		// istiod gave a type but no workload name: ztunnel leaves the key out.
		{"typed, unnamed", withMeta(&config.Workload{Name: "a", Namespace: "ns"}, config.WorkloadMeta{ClusterID: "Kubernetes", WorkloadType: "job"}, config.Locality{}), "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns"},
		{"cronjob, zone only", withMeta(&config.Workload{Name: "a", Namespace: "ns"}, config.WorkloadMeta{WorkloadType: "cronjob", WorkloadName: "nightly"}, config.Locality{Zone: "z1"}),
			"k8s.namespace.name=ns,k8s.cronjob.name=nightly,cloud.availability_zone=z1"},
		{"escaped", &config.Workload{Name: "a b,c=d", Namespace: "ns"}, "k8s.namespace.name=ns,k8s.pod.name=a%20b%2Cc%3Dd"},
		{"nil", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := baggage(tc.w); got != tc.want {
				t.Errorf("baggage = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestTraceHeaders: outbound CONNECTs carry a traceparent and the source's
// baggage, and the access log the trace ID; inbound, the peer's trace ID is
// logged and a malformed traceparent is ignored.
func TestTraceHeaders(t *testing.T) {
	t.Run("outbound", func(t *testing.T) {
		tunnels := &fakeTunnels{err: errRelayAborted}
		b := newBed(t, bedOpts{tunnels: tunnels})
		c := b.dialOutbound("/fake/client", b.ap(12, 8080))
		refused(t, c)
		rec := b.logs.next(t)
		tunnels.mu.Lock()
		defer tunnels.mu.Unlock()
		if len(tunnels.reqs) != 1 {
			t.Fatalf("%d tunnel requests", len(tunnels.reqs))
		}
		h := tunnels.reqs[0].Headers
		id := parseTraceparent(h.Get(headerTraceparent))
		if id == "" {
			t.Fatalf("traceparent %q", h.Get(headerTraceparent))
		}
		checkLog(t, rec, map[string]string{"trace_id": id})
		if bg := h.Get(headerBaggage); !strings.Contains(bg, "k8s.namespace.name=default") {
			t.Errorf("baggage %q", bg)
		}
	})
	for _, tc := range []struct{ name, header, want string }{
		{"inbound", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"},
		// As ztunnel sends it (src/proxy.rs TraceParent: flags 00, zero-padded IDs).
		{"inbound ztunnel", "00-000000000000000000000000000000ab-00000000000000cd-00", "000000000000000000000000000000ab"},
		{"inbound malformed", "garbage", absent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, bedOpts{})
			b.echoApp(b.ap(12, 9000), false)
			s, err := b.tunnelFrom(b.ip(30), b.ap(12, 9000), map[string]string{headerTraceparent: tc.header,
				headerBaggage: "k8s.cluster.name=Kubernetes,k8s.namespace.name=remote,k8s.deployment.name=client,service.name=client,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-1a"})
			if err != nil {
				t.Fatal(err)
			}
			exchange(t, s, "ping")
			checkLog(t, b.logs.next(t), map[string]string{"trace_id": tc.want})
		})
	}
}
