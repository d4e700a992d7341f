package scale

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/store"
	"github.com/warren-mesh/warren/pkg/config/xds"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi/security"
)

// XDSReport is the istiod provider's figures, fed by an in-process delta
// ADS server: the path an agent in --provider=istiod mode runs.
type XDSReport struct {
	InitialWallS float64 `json:"initial_wall_s"`
	InitialCPUS  float64 `json:"initial_cpu_s"`
	// HeapMiB is the live heap the first push added; RSS is the process's
	// before it and with the full view (the ADS server's copy of the mesh
	// dropped).
	HeapMiB     float64 `json:"heap_mib"`
	RSSBaseMiB  float64 `json:"rss_base_mib"`
	RSSFullMiB  float64 `json:"rss_full_mib"`
	HeapFullMiB float64 `json:"heap_full_mib"`
	// GCPercent is the collector's pace (package gctune, as in the agent).
	GCPercent int `json:"gc_percent"`
	// RSSAfterMiB and After: the process after the churn (the ADS server,
	// its gRPC buffers and the test's mesh generator included).
	RSSAfterMiB float64      `json:"rss_after_churn_mib"`
	After       MemBreakdown `json:"memory_after_churn"`
	// The churn: one-workload deltas (a restart in place or a replaced
	// pod), paced at Rate of the workloads per second when Rate > 0.
	Rate         float64 `json:"rate"`
	ChurnS       float64 `json:"churn_s"`
	Scheduled    int     `json:"scheduled"`
	Deltas       int     `json:"deltas"`
	VisibleP50Ms float64 `json:"visible_p50_ms"`
	VisibleP99Ms float64 `json:"visible_p99_ms"`
	VisibleMaxMs float64 `json:"visible_max_ms"`
	// CPUPerDeltaS is the process's CPU over the churn per delta: the
	// provider (decode, apply, ACK) plus the in-process ADS server's
	// marshalling and the store subscriber that waits for each delta.
	CPUPerDeltaS  float64 `json:"cpu_per_delta_s"`
	HeapPreMiB    float64 `json:"heap_before_churn_mib"`
	HeapAfterMiB  float64 `json:"heap_after_churn_mib"`
	GoroutinesPre int     `json:"goroutines_before_churn"`
	GoroutinesEnd int     `json:"goroutines_after_churn"`
}

// adsServer is a delta ADS server that pushes what it is given.
type adsServer struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	push chan *discoveryv3.DeltaDiscoveryResponse
	subs chan struct{} // one per subscription request
}

func (a *adsServer) DeltaAggregatedResources(s discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				return
			}
			if r.GetResponseNonce() == "" { // a subscription, not an ACK
				a.subs <- struct{}{}
			}
		}
	}()
	for {
		select {
		case r := <-a.push:
			if err := s.Send(r); err != nil {
				return err
			}
		case <-s.Context().Done():
			return nil
		}
	}
}

func anyOf(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // generated messages always marshal
	}
	return a
}

func xdsWorkload(w *config.Workload) *discoveryv3.Resource {
	pw := &workloadapi.Workload{Uid: w.UID, Name: w.Name, Namespace: w.Namespace, TrustDomain: w.TrustDomain,
		ServiceAccount: w.ServiceAccount, Node: w.Node, ClusterId: w.ClusterID(), WorkloadName: w.WorkloadName(),
		CanonicalName: w.CanonicalName(), CanonicalRevision: w.CanonicalRevision(), WorkloadType: workloadapi.WorkloadType_DEPLOYMENT,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, AuthorizationPolicies: w.AuthorizationPolicies,
		Locality: &workloadapi.Locality{Region: w.Locality().Region, Zone: w.Locality().Zone},
		Services: map[string]*workloadapi.PortList{}}
	for _, ip := range w.WorkloadIPs {
		pw.Addresses = append(pw.Addresses, ip.AsSlice())
	}
	for k := range w.Services {
		pw.Services[k.String()] = &workloadapi.PortList{}
	}
	return &discoveryv3.Resource{Name: w.UID, Version: "1", Resource: anyOf(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: pw}})}
}

func xdsService(s *config.Service) *discoveryv3.Resource {
	ps := &workloadapi.Service{Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname}
	for _, v := range s.VIPs {
		ps.Addresses = append(ps.Addresses, &workloadapi.NetworkAddress{Network: v.Network, Address: v.Addr.AsSlice()})
	}
	for sp, tp := range s.Ports {
		ps.Ports = append(ps.Ports, &workloadapi.Port{ServicePort: uint32(sp), TargetPort: uint32(tp)})
	}
	return &discoveryv3.Resource{Name: s.Key().String(), Version: "1", Resource: anyOf(&workloadapi.Address{Type: &workloadapi.Address_Service{Service: ps}})}
}

func xdsPolicy(p *config.AuthorizationPolicy) *discoveryv3.Resource {
	pa := &security.Authorization{Name: p.Name, Namespace: p.Namespace,
		Scope: map[config.Scope]security.Scope{config.ScopeGlobal: security.Scope_GLOBAL, config.ScopeNamespace: security.Scope_NAMESPACE,
			config.ScopeWorkloadSelector: security.Scope_WORKLOAD_SELECTOR}[p.Scope],
		Action: map[config.Action]security.Action{config.ActionAllow: security.Action_ALLOW, config.ActionDeny: security.Action_DENY}[p.Action]}
	for _, rule := range p.Rules {
		m := rule[0][0]
		pm := &security.Match{}
		for _, sm := range m.Principals {
			pm.Principals = append(pm.Principals, &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: sm.Value}})
		}
		for _, sm := range m.Namespaces {
			pm.Namespaces = append(pm.Namespaces, &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: sm.Value}})
		}
		for _, port := range m.DestinationPorts {
			pm.DestinationPorts = append(pm.DestinationPorts, uint32(port))
		}
		pa.Groups = append(pa.Groups, &security.Group{Rules: []*security.Rules{{Matches: []*security.Match{pm}}}})
	}
	return &discoveryv3.Resource{Name: p.Key(), Version: "1", Resource: anyOf(pa)}
}

// RunXDS feeds the mesh through the istiod provider (pkg/config/xds) from
// an in-process delta ADS server into a store: the first push of both
// types, then deltas one-workload changes (a restart in place with a new
// address, or a replaced pod: its removal and its successor in one
// response), paced at rate × workloads per second (rate 0: back to back),
// each timed from the push until a store subscriber sees a snapshot where
// the workload's new address resolves to it.
func RunXDS(ctx context.Context, m Mesh, deltas int, rate float64) (*XDSReport, error) {
	m.defaults()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("xds: listen: %w", err)
	}
	srv := grpc.NewServer(grpc.MaxSendMsgSize(1 << 30))
	ads := &adsServer{push: make(chan *discoveryv3.DeltaDiscoveryResponse), subs: make(chan struct{}, 8)}
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(srv, ads)
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.Serve(lis) })
	defer wg.Wait()
	defer srv.Stop()

	r := &XDSReport{Rate: rate}
	base, rss := settle()
	r.RSSBaseMiB = rss
	st := store.New(LocalNode)
	p, err := xds.New(st, xds.Options{Address: lis.Addr().String(), Node: LocalNode,
		Config:      config.Options{CheckNetns: okPath, CheckCgroup: okPath},
		DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1 << 30))}})
	if err != nil {
		return nil, fmt.Errorf("xds: %w", err)
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	wg.Go(func() { _ = p.Run(runCtx) })
	for range 2 {
		select {
		case <-ads.subs:
		case <-time.After(10 * time.Second):
			return nil, errors.New("xds: the provider did not subscribe")
		}
	}
	var auth, addr []*discoveryv3.Resource
	for k := range m.Policies {
		auth = append(auth, xdsPolicy(m.Policy(k)))
	}
	for j := range m.Services {
		addr = append(addr, xdsService(m.Service(j)))
	}
	for i := range m.Workloads {
		addr = append(addr, xdsWorkload(m.Workload(i, 0)))
	}
	cpu0, t0 := cpuTime(), time.Now()
	ads.push <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: xds.AuthorizationType, Nonce: "a0", Resources: auth}
	ads.push <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: "w0", Resources: addr}
	auth, addr = nil, nil
	if err := waitFor(ctx, func() bool { return st.Current().NumWorkloads() == m.Workloads }); err != nil {
		return nil, fmt.Errorf("xds: initial push: %w (%v)", err, p.LastError())
	}
	r.InitialWallS, r.InitialCPUS = time.Since(t0).Seconds(), (cpuTime() - cpu0).Seconds()
	defer debug.SetGCPercent(gcPercent())
	r.GCPercent = paceLikeTheAgent()
	r.HeapFullMiB, r.RSSFullMiB = settle()
	r.HeapMiB = r.HeapFullMiB - base

	gens := make([]uint32, m.Workloads)
	var visible hist
	sub := st.Subscribe()
	defer sub.Close()
	if _, err := sub.Next(ctx); err != nil { // the initial view
		return nil, fmt.Errorf("xds: subscribe: %w", err)
	}
	r.HeapPreMiB, _ = settle()
	r.GoroutinesPre = runtime.NumGoroutine()
	rng := rand.New(rand.NewPCG(17, 17))
	perSecond := rate * float64(m.Workloads)
	cpu0, start := cpuTime(), time.Now()
	for n := range deltas {
		if perSecond > 0 {
			if wait := time.Duration(float64(n)/perSecond*float64(time.Second)) - time.Since(start); wait > 0 {
				time.Sleep(wait)
			}
		}
		i := rng.IntN(m.Workloads)
		old := m.Workload(i, gens[i])
		gens[i]++
		w := m.Workload(i, gens[i])
		resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: fmt.Sprint("d", n), Resources: []*discoveryv3.Resource{xdsWorkload(w)}}
		if old.UID != w.UID {
			resp.RemovedResources = []string{old.UID}
		}
		t := time.Now()
		ads.push <- resp
		dctx, cancel := context.WithTimeout(ctx, time.Minute)
		for {
			if _, err := sub.Next(dctx); err != nil {
				cancel()
				return nil, fmt.Errorf("xds: delta %d: %w (%v)", n, err, p.LastError())
			}
			if got, ok := st.Current().WorkloadByIP("", w.WorkloadIPs[0]); ok && got.UID == w.UID {
				break
			}
		}
		cancel()
		visible.add(time.Since(t))
	}
	churn := time.Since(start)
	r.Deltas, r.ChurnS = visible.n, churn.Seconds()
	r.Scheduled = deltas
	if r.Deltas > 0 {
		r.CPUPerDeltaS = (cpuTime() - cpu0).Seconds() / float64(r.Deltas)
	}
	r.VisibleP50Ms, r.VisibleP99Ms, r.VisibleMaxMs = us(visible.pct(50))/1000, us(visible.pct(99))/1000, us(visible.pct(100))/1000
	r.HeapAfterMiB, r.RSSAfterMiB = settle()
	r.After = memBreakdown()
	r.GoroutinesEnd = runtime.NumGoroutine()
	if n := st.Current().NumWorkloads(); n != m.Workloads {
		return r, fmt.Errorf("xds: after the churn: %d workloads, want %d", n, m.Workloads)
	}
	if s := p.Status().(xds.Status); s.Nacks > 0 {
		return r, fmt.Errorf("xds: %d NACKs: %s", s.Nacks, s.LastNack)
	}
	stop()
	return r, nil
}

// waitFor polls cond every 100 µs for up to a minute.
func waitFor(ctx context.Context, cond func() bool) error {
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if ctx.Err() != nil || time.Now().After(deadline) {
			return errors.New("timed out")
		}
		time.Sleep(100 * time.Microsecond)
	}
	return nil
}

// xdsMarkdown renders the istiod provider's figures.
func xdsMarkdown(x *XDSReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| istiod provider (pkg/config/xds): first push applied | %.2f s wall, %.2f s CPU |\n", x.InitialWallS, x.InitialCPUS)
	fmt.Fprintf(&b, "| istiod provider: RSS before / with the full view; live heap with it (added by the first push) | %.0f / %.0f MiB; %.0f MiB (%.0f MiB) |\n",
		x.RSSBaseMiB, x.RSSFullMiB, x.HeapFullMiB, x.HeapMiB)
	fmt.Fprintf(&b, "| istiod provider: RSS after its deltas: anonymous / file-backed; Go heap objects / fragmentation / free, not returned / stacks / runtime | %.0f MiB: %.0f / %.0f; %.0f / %.0f / %.0f / %.1f / %.0f MiB |\n",
		x.RSSAfterMiB, x.After.RSSAnon, x.After.RSSFile, x.After.HeapObjects, x.After.HeapUnused, x.After.HeapFree, x.After.Stacks, x.After.Runtime)
	pace := "back to back"
	if x.Rate > 0 {
		pace = fmt.Sprintf("paced at %.1f %%/s", 100*x.Rate)
	}
	fmt.Fprintf(&b, "| istiod provider: one-workload deltas (push → visible on store.Current via a subscriber) | %d of %d in %.0f s, %s |\n", x.Deltas, x.Scheduled, x.ChurnS, pace)
	fmt.Fprintf(&b, "| istiod provider: delta visible p50 / p99 / max | %.2f / %.2f / %.2f ms |\n", x.VisibleP50Ms, x.VisibleP99Ms, x.VisibleMaxMs)
	fmt.Fprintf(&b, "| istiod provider: CPU per 1,000 deltas (provider, ADS server, subscriber, GC) | %.3f s |\n", 1000*x.CPUPerDeltaS)
	fmt.Fprintf(&b, "| istiod provider: live heap before / after the deltas; goroutines | %.1f / %.1f MiB; %d → %d |\n",
		x.HeapPreMiB, x.HeapAfterMiB, x.GoroutinesPre, x.GoroutinesEnd)
	return b.String()
}
