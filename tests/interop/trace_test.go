package interop

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"regexp"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/ztunnel"
)

// ztunnelTraceparent is the traceparent ztunnel sends (istio/ztunnel
// 62d826530e5ce85764e309170205b293efcbc80b, src/proxy.rs TraceParent: its
// Debug format "{:02x}-{:032x}-{:016x}-{:02x}" with version 0 and flags 0).
var ztunnelTraceparent = regexp.MustCompile(`^00-([0-9a-f]{32})-[0-9a-f]{16}-00$`)

// headerLog records the headers of every CONNECT a server received.
type headerLog struct {
	mu  sync.Mutex
	got []http.Header
}

func (l *headerLog) add(h http.Header) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.got = append(l.got, h.Clone())
}

func (l *headerLog) all() []http.Header {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]http.Header(nil), l.got...)
}

// TestWarrenTraceHeadersAtIstioServer: the headers warren's outbound proxy
// puts on every CONNECT (ztunnel.SetTraceHeaders, the function
// pkg/ztunnel's dialHBONE calls) arrive at Istio's own HBONE server
// (istio.io/istio pkg/hbone) exactly as ztunnel sends them: one traceparent
// in ztunnel's format with the trace ID the access log records, fresh per
// connection, and one baggage with ztunnel's keys in ztunnel's order
// (src/baggage.rs baggage_header_val, src/state/workload.rs
// Workload::baggage at the same commit).
func TestWarrenTraceHeadersAtIstioServer(t *testing.T) {
	p := newPKI(t)
	echo := startEcho(t)
	var log headerLog
	addr := startIstioServerObserved(t, p, log.add)
	pool, err := hbone.NewPool(hbone.PoolConfig{TLS: p.clientTLS(), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	sources := []struct {
		name    string
		w       *config.Workload
		baggage string
	}{
		// As the istiod provider converts a Deployment's pod (workload type, name, canonical labels, locality).
		{"istiod deployment", withMeta(&config.Workload{Name: "client-7d9f-x2x", Namespace: "client-ns"},
			config.WorkloadMeta{ClusterID: "Kubernetes", WorkloadType: "deployment", WorkloadName: "client", CanonicalName: "client", CanonicalRevision: "v1"},
			config.Locality{Region: "eu-west", Zone: "eu-west-1a"}),
			"k8s.cluster.name=Kubernetes,k8s.namespace.name=client-ns,k8s.deployment.name=client,service.name=client,service.version=v1,cloud.region=eu-west,cloud.availability_zone=eu-west-1a"},
		// istiod gave a type but no name, nor locality: those keys are left out, as ztunnel does.
		{"istiod job, sparse", withMeta(&config.Workload{Name: "batch-x", Namespace: "client-ns"},
			config.WorkloadMeta{ClusterID: "c2", WorkloadType: "job", CanonicalName: "batch"}, config.Locality{}),
			"k8s.cluster.name=c2,k8s.namespace.name=client-ns,service.name=batch"},
	}
	const perSource = 5
	want := map[string]string{} // trace ID -> baggage
	for _, src := range sources {
		for i := range perSource {
			req := hbone.Request{Source: p.client.ID, Expected: []spiffeid.ID{p.server.ID}, Addr: mustAddrPort(addr),
				Authority: echo, Headers: http.Header{}}
			id := ztunnel.SetTraceHeaders(req.Headers, src.w)
			if _, dup := want[id]; dup {
				t.Fatalf("trace ID %s reused", id)
			}
			want[id] = src.baggage
			ctx, cancel := dialCtx()
			s, err := pool.Dial(ctx, req)
			cancel()
			if err != nil {
				t.Fatalf("%s #%d: dial Istio's server: %v", src.name, i, err)
			}
			err = checkEcho(s, 4096, true)
			s.Close()
			if err != nil {
				t.Fatalf("%s #%d: %v", src.name, i, err)
			}
		}
	}
	got := log.all()
	if len(got) != len(want) {
		t.Fatalf("Istio's server saw %d CONNECTs, want %d", len(got), len(want))
	}
	for i, h := range got {
		tps, bgs := h.Values("traceparent"), h.Values("baggage")
		if len(tps) != 1 || len(bgs) != 1 {
			t.Errorf("CONNECT %d: traceparent %q, baggage %q: want one of each", i, tps, bgs)
			continue
		}
		m := ztunnelTraceparent.FindStringSubmatch(tps[0])
		if m == nil {
			t.Errorf("CONNECT %d: traceparent %q is not ztunnel's format 00-<32 hex>-<16 hex>-00", i, tps[0])
			continue
		}
		wantBaggage, ok := want[m[1]]
		if !ok {
			t.Errorf("CONNECT %d: trace ID %s is none SetTraceHeaders returned", i, m[1])
			continue
		}
		delete(want, m[1])
		if bgs[0] != wantBaggage {
			t.Errorf("CONNECT %d: baggage\n got %s\nwant %s", i, bgs[0], wantBaggage)
		}
	}
}

// TestZtunnelTraceHeadersAtWarren: a CONNECT carrying ztunnel-format
// traceparent and baggage, sent by Go's HTTP/2 client (Istio's Go HBONE
// client has no way to add headers), reaches warren's HBONE server with both
// intact, and ztunnel.TraceID (what warren's inbound logs as trace_id) reads
// ztunnel's trace ID from it. pkg/ztunnel TestTraceHeaders shows the
// inbound proxy logging it.
func TestZtunnelTraceHeadersAtWarren(t *testing.T) {
	p := newPKI(t)
	echo := startEcho(t)
	var log headerLog
	_, addr := startWarrenServerWith(t, p, hbone.HandlerFunc(func(ctx context.Context, r *hbone.ServerRequest) (net.Conn, error) {
		log.add(r.Headers)
		return (&net.Dialer{}).DialContext(ctx, "tcp", r.Authority.String())
	}))
	const (
		traceID = "0af7651916cd43dd8448eb211c80319c"
		tp      = "00-" + traceID + "-00f067aa0ba902b7-00"
		bg      = "k8s.cluster.name=Kubernetes,k8s.namespace.name=remote,k8s.deployment.name=client,service.name=client,service.version=v1"
	)
	cfg := tlsconfig.MTLSClientConfig(p.client, p.ca.Bundle(), tlsconfig.AuthorizeID(p.server.ID))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{"h2"}
	protocols := new(http.Protocols)
	protocols.SetHTTP2(true)
	tr := &http.Transport{TLSClientConfig: cfg, Protocols: protocols}
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodConnect, "https://"+addr, pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = echo.String()
	req.Header.Set("traceparent", tp)
	req.Header.Set("baggage", bg)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT: %s", resp.Status)
	}
	go func() { pw.Write([]byte("ping")); pw.Close() }()
	if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "ping" {
		t.Fatalf("echo %q, %v", b, err)
	}
	got := log.all()
	if len(got) != 1 {
		t.Fatalf("warren's server saw %d CONNECTs", len(got))
	}
	if g := got[0].Values("Baggage"); len(g) != 1 || g[0] != bg {
		t.Errorf("baggage %q, want %q", g, bg)
	}
	if id := ztunnel.TraceID(got[0]); id != traceID {
		t.Errorf("ztunnel.TraceID = %q, want %q (traceparent %q)", id, traceID, got[0].Get("Traceparent"))
	}
}

// startIstioServerObserved is startIstioServer with observe called on each
// CONNECT's headers before Istio's handler serves it.
func startIstioServerObserved(t testing.TB, p *pki, observe func(http.Header)) string {
	return startIstioServerWith(t, p, func(inner http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodConnect {
				observe(r.Header)
			}
			inner.ServeHTTP(w, r)
		})
	})
}

// withMeta sets w's WorkloadMeta and Locality (not fields: see config.Workload) and returns w.
func withMeta(w *config.Workload, m config.WorkloadMeta, l config.Locality) *config.Workload {
	w.SetMeta(m)
	w.SetLocality(l)
	return w
}
