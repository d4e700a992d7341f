package xds

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi/security"
)

// fakeADS is a hand-rolled delta ADS server: each stream is handed to the
// test, which sends responses and reads requests.
type fakeADS struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	streams chan *fakeStream
}

type fakeStream struct {
	reqs chan *discoveryv3.DeltaDiscoveryRequest
	send chan *discoveryv3.DeltaDiscoveryResponse
	done chan struct{} // close to end the stream (istiod going away)
}

func (f *fakeADS) DeltaAggregatedResources(s discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	fs := &fakeStream{reqs: make(chan *discoveryv3.DeltaDiscoveryRequest, 16), send: make(chan *discoveryv3.DeltaDiscoveryResponse), done: make(chan struct{})}
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				close(fs.reqs)
				return
			}
			fs.reqs <- r
		}
	}()
	f.streams <- fs
	for {
		select {
		case r := <-fs.send:
			if err := s.Send(r); err != nil {
				return err
			}
		case <-fs.done:
			return nil
		case <-s.Context().Done():
			return nil
		}
	}
}

func (fs *fakeStream) req(t *testing.T) *discoveryv3.DeltaDiscoveryRequest {
	t.Helper()
	select {
	case r, ok := <-fs.reqs:
		if !ok {
			t.Fatal("stream closed")
		}
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no request from the client")
	}
	return nil
}

type pubs struct {
	mu    sync.Mutex
	snaps []*config.Snapshot
}

func (p *pubs) Publish(s *config.Snapshot) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.snaps = append(p.snaps, s)
	return uint64(len(p.snaps))
}

func (p *pubs) last() (*config.Snapshot, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.snaps) == 0 {
		return nil, 0
	}
	return p.snaps[len(p.snaps)-1], len(p.snaps)
}

type fakePods map[PodRef]Netns

func (f fakePods) Resolve(refs []PodRef) (map[PodRef]Netns, error) {
	out := map[PodRef]Netns{}
	for _, r := range refs {
		if n, ok := f[r]; ok {
			out[r] = n
		}
	}
	return out, nil
}

func wl(name, node string, ip []byte, hbone bool) *workloadapi.Workload {
	w := &workloadapi.Workload{Uid: "Kubernetes//Pod/default/" + name, Name: name, Namespace: "default",
		Addresses: [][]byte{ip}, Node: node, ServiceAccount: "sa-" + name, TrustDomain: "cluster.local",
		Services: map[string]*workloadapi.PortList{"default/echo.default.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 9000}}}}}
	if hbone {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	}
	return w
}

func res(t *testing.T, name string, m proto.Message) *discoveryv3.Resource {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return &discoveryv3.Resource{Name: name, Version: "1", Resource: a}
}

func wres(t *testing.T, w *workloadapi.Workload) *discoveryv3.Resource {
	return res(t, w.GetUid(), &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
}

func echoSvc(t *testing.T) *discoveryv3.Resource {
	return res(t, "default/echo.default.svc.cluster.local", &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "echo", Namespace: "default", Hostname: "echo.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{198, 18, 200, 10}}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 9000}}}}})
}

func authz(t *testing.T, name string, action security.Action, principal string) *discoveryv3.Resource {
	return res(t, "default/"+name, &security.Authorization{Name: name, Namespace: "default", Scope: security.Scope_NAMESPACE, Action: action,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Principals: []*security.StringMatch{
			{MatchType: &security.StringMatch_Exact{Exact: principal}}}}}}}}}})
}

// expectAck reads the next request and checks it ACKs (or NACKs, naming
// want) nonce.
func expectAck(t *testing.T, fs *fakeStream, nonce, nackWant string) {
	t.Helper()
	r := fs.req(t)
	if r.GetResponseNonce() != nonce {
		t.Fatalf("request for nonce %q, want %q", r.GetResponseNonce(), nonce)
	}
	switch {
	case nackWant == "" && r.GetErrorDetail() != nil:
		t.Fatalf("NACK of %s: %s", nonce, r.GetErrorDetail().GetMessage())
	case nackWant != "" && r.GetErrorDetail() == nil:
		t.Fatalf("ACK of %s, want a NACK naming %q", nonce, nackWant)
	case nackWant != "" && !strings.Contains(r.GetErrorDetail().GetMessage(), nackWant):
		t.Fatalf("NACK of %s says %q, want it to name %q", nonce, r.GetErrorDetail().GetMessage(), nackWant)
	}
}

func TestProvider(t *testing.T) {
	ads := &fakeADS{streams: make(chan *fakeStream, 4)}
	srv := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(srv, ads)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)

	pub := &pubs{}
	p, err := New(pub, Options{
		Address: ln.Addr().String(), Node: "node1", PodName: "warren-abc", PodNamespace: "istio-system",
		InstanceIPs: []string{"10.0.0.1"}, ClusterID: "Kubernetes",
		LocalPods:   fakePods{{Namespace: "default", Name: "client1"}: {Path: "/run/netns/client1"}},
		Config:      config.Options{CheckNetns: func(string) error { return nil }},
		DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())},
		BackoffMin:  10 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	nextStream := func() *fakeStream {
		t.Helper()
		select {
		case fs := <-ads.streams:
			return fs
		case <-time.After(10 * time.Second):
			t.Fatal("the provider did not open a stream")
		}
		return nil
	}
	fs := nextStream()
	for _, want := range []string{AddressType, AuthorizationType} {
		r := fs.req(t)
		if r.GetTypeUrl() != want || r.GetResponseNonce() != "" {
			t.Fatalf("subscription %s nonce %q, want %s", r.GetTypeUrl(), r.GetResponseNonce(), want)
		}
		if got, wantID := r.GetNode().GetId(), "ztunnel~10.0.0.1~warren-abc.istio-system~istio-system.svc.cluster.local"; got != wantID {
			t.Errorf("node id %q, want %q", got, wantID)
		}
		if got := r.GetNode().GetMetadata().GetFields()["NODE_NAME"].GetStringValue(); got != "node1" {
			t.Errorf("NODE_NAME %q", got)
		}
	}
	if p.LastError() == nil {
		t.Error("ready before the first push")
	}

	client1 := wl("client1", "node1", []byte{10, 1, 0, 1}, true)
	server2 := wl("server2", "node2", []byte{10, 2, 0, 1}, true)
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "a1",
		Resources: []*discoveryv3.Resource{wres(t, client1), wres(t, server2), echoSvc(t)}}
	expectAck(t, fs, "a1", "")
	if _, n := pub.last(); n != 0 {
		t.Fatalf("published before the Authorization type synced")
	}
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z1",
		Resources: []*discoveryv3.Resource{authz(t, "deny-x", security.Action_DENY, "cluster.local/ns/default/sa/x")}}
	expectAck(t, fs, "z1", "")
	snap, _ := pub.last()
	if snap == nil || p.LastError() != nil {
		t.Fatalf("not published after both types synced: %v", p.LastError())
	}
	if en := snap.EnrolledWorkloads(); len(en) != 1 || en[0].Name != "client1" || en[0].NetnsPath() != "/run/netns/client1" {
		t.Fatalf("enrolled %v", en)
	}
	if svc, ok := snap.ServiceByKey(config.NamespacedHostname{Namespace: "default", Hostname: "echo.default.svc.cluster.local"}); !ok || len(snap.Endpoints(svc)) != 2 {
		t.Fatalf("service echo: %v", ok)
	}

	steps := []struct {
		name     string
		resp     *discoveryv3.DeltaDiscoveryResponse
		nackWant string
		check    func(t *testing.T, s *config.Snapshot)
	}{
		{
			name: "unusable resource NACKed, the good one in the same push applied",
			resp: &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Resources: []*discoveryv3.Resource{
				wres(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/default/bad", Name: "bad", Namespace: "default", Addresses: [][]byte{{1, 2, 3}}}),
				wres(t, wl("server3", "node2", []byte{10, 2, 0, 3}, true)),
			}},
			nackWant: "Kubernetes//Pod/default/bad: addresses[0]: 3 bytes",
			check: func(t *testing.T, s *config.Snapshot) {
				if _, ok := s.WorkloadByUID("Kubernetes//Pod/default/server3"); !ok {
					t.Error("server3 not applied")
				}
				if _, ok := s.WorkloadByUID("Kubernetes//Pod/default/bad"); ok {
					t.Error("bad applied")
				}
			},
		},
		{
			name: "a change that breaks the whole configuration is NACKed and the previous version stays",
			resp: &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Resources: []*discoveryv3.Resource{
				wres(t, wl("server3", "node2", []byte{10, 2, 0, 1}, true)), // server2's IP
			}},
			nackWant: "Kubernetes//Pod/default/server3",
			check: func(t *testing.T, s *config.Snapshot) {
				w, ok := s.WorkloadByUID("Kubernetes//Pod/default/server3")
				if !ok || w.WorkloadIPs[0].String() != "10.2.0.3" {
					t.Errorf("server3 = %v, want its previous address 10.2.0.3", w)
				}
			},
		},
		{
			name: "tunnel protocol warren cannot speak is NACKed",
			resp: &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Resources: []*discoveryv3.Resource{
				wres(t, &workloadapi.Workload{Uid: "Kubernetes//Pod/default/sidecar", Name: "sidecar", Namespace: "default",
					Addresses: [][]byte{{10, 3, 0, 1}}, TunnelProtocol: workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS}),
			}},
			nackWant: "LEGACY_ISTIO_MTLS",
		},
		{
			name: "an Authorization with an unusable value fails closed (ACKed, marked invalid)",
			resp: &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Resources: []*discoveryv3.Resource{
				authz(t, "allow-bad", security.Action_ALLOW, "cluster.local/ns/*/sa/x"),
			}},
			check: func(t *testing.T, s *config.Snapshot) {
				ap, ok := s.Policy("default/allow-bad")
				if !ok || len(ap.Rules) != 0 || len(ap.Invalid) != 1 {
					t.Errorf("allow-bad = %+v, want no rules and one invalid group", ap)
				}
			},
		},
		{
			name: "removal",
			resp: &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, RemovedResources: []string{"Kubernetes//Pod/default/server3"}},
			check: func(t *testing.T, s *config.Snapshot) {
				if _, ok := s.WorkloadByUID("Kubernetes//Pod/default/server3"); ok {
					t.Error("server3 still there")
				}
			},
		},
	}
	for i, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.resp.Nonce = "n" + string(rune('a'+i))
			_, before := pub.last()
			fs.send <- st.resp
			expectAck(t, fs, st.resp.Nonce, st.nackWant)
			snap, after := pub.last()
			if after > before+1 {
				t.Fatalf("published %d times, want at most once", after-before)
			}
			if st.check != nil {
				st.check(t, snap)
			}
		})
	}

	t.Run("istiod away: the last configuration stays, the stream comes back", func(t *testing.T) {
		snap, n := pub.last()
		close(fs.done)
		fs = nextStream()
		fs.req(t)
		fs.req(t)
		if _, n2 := pub.last(); n2 != n {
			t.Fatalf("published while istiod was away")
		}
		if p.LastError() != nil {
			t.Errorf("not ready while istiod is away after the first sync: %v", p.LastError())
		}
		// istiod's first push on the new stream is its whole state: server2
		// was deleted while the stream was down.
		fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "r1",
			Resources: []*discoveryv3.Resource{wres(t, client1), echoSvc(t)}}
		expectAck(t, fs, "r1", "")
		now, _ := pub.last()
		if _, ok := now.WorkloadByUID(server2.GetUid()); ok {
			t.Error("server2 kept after a full push without it")
		}
		if _, ok := snap.WorkloadByUID(server2.GetUid()); !ok {
			t.Error("the previous snapshot lost server2")
		}
		if s := p.Status().(Status); s.Streams != 2 || s.Nacks != 3 {
			t.Errorf("status streams %d nacks %d, want 2 and 3", s.Streams, s.Nacks)
		}
	})
	cancel()
	if err := <-done; err != context.Canceled {
		t.Errorf("Run returned %v", err)
	}
}

func TestConvertAuthorization(t *testing.T) {
	sm := func(s string) []*security.StringMatch {
		return []*security.StringMatch{{MatchType: &security.StringMatch_Prefix{Prefix: s}}}
	}
	for _, tc := range []struct {
		name        string
		m           *security.Match
		wantInvalid string
	}{
		{"good", &security.Match{Namespaces: sm("team-"), DestinationPorts: []uint32{80}, SourceIps: []*security.Address{{Address: []byte{10, 0, 0, 0}, Length: 8}}}, ""},
		{"port out of range", &security.Match{DestinationPorts: []uint32{70000}}, "destinationPorts"},
		{"prefix length", &security.Match{SourceIps: []*security.Address{{Address: []byte{10, 0, 0, 0}, Length: 33}}}, "sourceIps"},
		{"address bytes", &security.Match{NotDestinationIps: []*security.Address{{Address: []byte{10, 0}, Length: 8}}}, "notDestinationIps"},
		{"wildcard inside", &security.Match{Principals: sm("a*b")}, "principals"},
		{"service account", &security.Match{ServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "ns", ServiceAccount: "a/b"}}}, "serviceAccounts"},
		{"extension", &security.Match{Extensions: []*workloadapi.Extension{{Name: "x"}}}, "extensions"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, action := range []security.Action{security.Action_ALLOW, security.Action_DENY} {
				ap, err := convertAuthorization(&security.Authorization{Name: "p", Namespace: "ns", Action: action,
					Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{tc.m}}}}}})
				if err != nil {
					t.Fatal(err)
				}
				if tc.wantInvalid == "" {
					if len(ap.Invalid) != 0 || len(ap.Rules) != 1 {
						t.Fatalf("%v: rules %v invalid %v", action, ap.Rules, ap.Invalid)
					}
					continue
				}
				if len(ap.Rules) != 0 || len(ap.Invalid) != 1 || !strings.Contains(ap.Invalid[0], tc.wantInvalid) {
					t.Fatalf("%v: rules %v invalid %v, want the group invalid naming %s", action, ap.Rules, ap.Invalid, tc.wantInvalid)
				}
			}
		})
	}
	if _, err := convertAuthorization(&security.Authorization{Name: "p", Namespace: "ns", Action: 7}); err == nil {
		t.Error("unknown action accepted")
	}
}

// lockedPods is a fakePods the test changes while the provider runs.
type lockedPods struct {
	mu sync.Mutex
	m  fakePods
}

func (l *lockedPods) Resolve(refs []PodRef) (map[PodRef]Netns, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.m.Resolve(refs)
}

func (l *lockedPods) set(ref PodRef, n Netns) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.m[ref] = n
}

// startProvider runs a provider for node1 against a fake ADS server and
// returns its publisher and the stream it opened (subscriptions read).
func startProvider(t *testing.T, pods LocalPods) (*Provider, *pubs, *fakeStream) {
	t.Helper()
	ads := &fakeADS{streams: make(chan *fakeStream, 4)}
	srv := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(srv, ads)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	pub := &pubs{}
	p, err := New(pub, Options{Address: ln.Addr().String(), Node: "node1", LocalPods: pods,
		Config:        config.Options{CheckNetns: func(string) error { return nil }},
		DialOptions:   []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())},
		RetryInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	var fs *fakeStream
	select {
	case fs = <-ads.streams:
	case <-time.After(10 * time.Second):
		t.Fatal("the provider did not open a stream")
	}
	fs.req(t)
	fs.req(t)
	return p, pub, fs
}

func selectorPolicy(t *testing.T, name string, scope security.Scope) *discoveryv3.Resource {
	return res(t, "default/"+name, &security.Authorization{Name: name, Namespace: "default", Scope: scope, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Principals: []*security.StringMatch{
			{MatchType: &security.StringMatch_Exact{Exact: "cluster.local/ns/default/sa/x"}}}}}}}}}})
}

// TestProviderIncremental: pushes are applied as deltas on the published
// snapshot (unchanged workloads are the same objects), references not
// received yet are ignored until they arrive and dropped when they go (or
// the policy leaves the WorkloadSelector scope), and a local pod whose
// network namespace appears later is enrolled.
func TestProviderIncremental(t *testing.T) {
	pods := &lockedPods{m: fakePods{}}
	p, pub, fs := startProvider(t, pods)
	svcKey := config.NamespacedHostname{Namespace: "default", Hostname: "echo.default.svc.cluster.local"}

	// server2 names the echo service and the WorkloadSelector policy
	// "default/sel", neither sent yet; client1 is local, its netns unknown.
	server2 := wl("server2", "node2", []byte{10, 2, 0, 1}, true)
	server2.AuthorizationPolicies = []string{"default/sel"}
	server4 := wl("server4", "node2", []byte{10, 2, 0, 4}, true)
	server4.Services = nil
	client1 := wl("client1", "node1", []byte{10, 1, 0, 1}, true)
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "a1",
		Resources: []*discoveryv3.Resource{wres(t, server2), wres(t, server4), wres(t, client1)}}
	expectAck(t, fs, "a1", "")
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z1"}
	expectAck(t, fs, "z1", "")
	s1, n := pub.last()
	if n != 1 {
		t.Fatalf("published %d times, want once after both types synced", n)
	}
	w, _ := s1.WorkloadByUID(server2.GetUid())
	if len(w.Services) != 0 || len(w.AuthorizationPolicies) != 0 {
		t.Fatalf("server2 applied with references not received: %v %v", w.Services, w.AuthorizationPolicies)
	}
	if c, _ := s1.WorkloadByUID(client1.GetUid()); c.InMesh() || len(s1.EnrolledWorkloads()) != 0 {
		t.Fatalf("client1 in the mesh before its network namespace is found")
	}
	if st := p.Status().(Status); len(st.Waiting) != 1 || !strings.Contains(strings.Join(st.Notes, "\n"), server2.GetUid()+": references not (yet) received") {
		t.Errorf("status waiting %v notes %v", st.Waiting, st.Notes)
	}

	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "a2", Resources: []*discoveryv3.Resource{echoSvc(t)}}
	expectAck(t, fs, "a2", "")
	s2, _ := pub.last()
	if svc, ok := s2.ServiceByKey(svcKey); !ok || len(s2.Endpoints(svc)) != 2 {
		t.Fatalf("the service's endpoints once it arrived: %v", ok)
	}
	x, _ := s1.WorkloadByUID(server4.GetUid())
	if y, _ := s2.WorkloadByUID(server4.GetUid()); x != y {
		t.Error("an unchanged workload was copied: the push rebuilt the configuration")
	}

	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z2",
		Resources: []*discoveryv3.Resource{selectorPolicy(t, "sel", security.Scope_WORKLOAD_SELECTOR)}}
	expectAck(t, fs, "z2", "")
	s3, _ := pub.last()
	if w, _ := s3.WorkloadByUID(server2.GetUid()); len(s3.PoliciesFor(w)) != 1 {
		t.Fatalf("server2's policies once sel arrived: %v", s3.PoliciesFor(w))
	}
	if st := p.Status().(Status); strings.Contains(strings.Join(st.Notes, "\n"), "references not (yet) received") {
		t.Errorf("notes still list ignored references: %v", st.Notes)
	}

	// The policy goes while server2 still names it: removed, server2 keeps
	// working without it (as if never received).
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z3", RemovedResources: []string{"default/sel"}}
	expectAck(t, fs, "z3", "")
	s4, _ := pub.last()
	if _, ok := s4.Policy("default/sel"); ok {
		t.Fatal("sel still there")
	}
	if w, _ := s4.WorkloadByUID(server2.GetUid()); len(w.AuthorizationPolicies) != 0 {
		t.Fatalf("server2 still lists %v", w.AuthorizationPolicies)
	}
	// ... and comes back: server2 gets it again.
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z4",
		Resources: []*discoveryv3.Resource{selectorPolicy(t, "sel", security.Scope_WORKLOAD_SELECTOR)}}
	expectAck(t, fs, "z4", "")
	if s, _ := pub.last(); len(s.PoliciesFor(&config.Workload{UID: server2.GetUid()})) != 1 {
		t.Fatalf("server2's policies once sel came back: %v", s.PoliciesFor(&config.Workload{UID: server2.GetUid()}))
	}

	// sel becomes Namespace-scoped: server2 no longer lists it; back to
	// WorkloadSelector: server2 lists it again.
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z5",
		Resources: []*discoveryv3.Resource{selectorPolicy(t, "sel", security.Scope_NAMESPACE)}}
	expectAck(t, fs, "z5", "")
	s6, _ := pub.last()
	w6, _ := s6.WorkloadByUID(server2.GetUid())
	if ap, _ := s6.Policy("default/sel"); ap == nil || ap.Scope != config.ScopeNamespace || len(w6.AuthorizationPolicies) != 0 {
		t.Fatalf("after the scope change: policy %+v, server2 lists %v", ap, w6.AuthorizationPolicies)
	}
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AuthorizationType, Nonce: "z6",
		Resources: []*discoveryv3.Resource{selectorPolicy(t, "sel", security.Scope_WORKLOAD_SELECTOR)}}
	expectAck(t, fs, "z6", "")
	s7, _ := pub.last()
	if w, _ := s7.WorkloadByUID(server2.GetUid()); len(w.AuthorizationPolicies) != 1 {
		t.Fatalf("after the scope came back: server2 lists %v", w.AuthorizationPolicies)
	}

	// The service goes while workloads back it.
	fs.send <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "a3", RemovedResources: []string{svcKey.String()}}
	expectAck(t, fs, "a3", "")
	s5, _ := pub.last()
	if _, ok := s5.ServiceByKey(svcKey); ok {
		t.Fatal("echo still there")
	}
	if w, _ := s5.WorkloadByUID(server2.GetUid()); len(w.Services) != 0 || len(w.AuthorizationPolicies) != 1 {
		t.Fatalf("server2 backs %v and lists %v, want no service and its policy", w.Services, w.AuthorizationPolicies)
	}

	// client1's network namespace appears: enrolled without a push.
	pods.set(PodRef{Namespace: "default", Name: "client1"}, Netns{Path: "/run/netns/client1"})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if s, _ := pub.last(); len(s.EnrolledWorkloads()) == 1 && s.EnrolledWorkloads()[0].NetnsPath() == "/run/netns/client1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("client1 not enrolled once its network namespace was found")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := p.LastError(); err != nil {
		t.Errorf("not ready once every local pod is enrolled: %v", err)
	}
}
