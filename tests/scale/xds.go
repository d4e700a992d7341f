package scale

import (
	"context"
	"errors"
	"fmt"
	"net"
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
// ADS server.
type XDSReport struct {
	InitialWallS float64 `json:"initial_wall_s"`
	InitialCPUS  float64 `json:"initial_cpu_s"`
	HeapMiB      float64 `json:"heap_mib"`
	Deltas       int     `json:"deltas"`
	VisibleP50Ms float64 `json:"visible_p50_ms"`
	VisibleMaxMs float64 `json:"visible_max_ms"`
	CPUPerDeltaS float64 `json:"cpu_per_delta_s"`
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
		ServiceAccount: w.ServiceAccount, Node: w.Node, ClusterId: w.ClusterID, WorkloadName: w.WorkloadName,
		CanonicalName: w.CanonicalName, CanonicalRevision: w.CanonicalRevision, WorkloadType: workloadapi.WorkloadType_DEPLOYMENT,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, AuthorizationPolicies: w.AuthorizationPolicies,
		Locality: &workloadapi.Locality{Region: w.Locality.Region, Zone: w.Locality.Zone},
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
// types, then deltas one-workload restarts, each timed until a reader
// finds the workload's new address on store.Current.
func RunXDS(ctx context.Context, m Mesh, deltas int) (*XDSReport, error) {
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

	base, _ := settle()
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
	r := &XDSReport{}
	cpu0, t0 := cpuTime(), time.Now()
	ads.push <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: xds.AuthorizationType, Nonce: "a0", Resources: auth}
	ads.push <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: "w0", Resources: addr}
	auth, addr = nil, nil
	if err := waitFor(ctx, func() bool { return st.Current().NumWorkloads() == m.Workloads }); err != nil {
		return nil, fmt.Errorf("xds: initial push: %w (%v)", err, p.LastError())
	}
	r.InitialWallS, r.InitialCPUS = time.Since(t0).Seconds(), (cpuTime() - cpu0).Seconds()
	heap, _ := settle()
	r.HeapMiB = heap - base

	var visible []time.Duration
	cpu0 = cpuTime()
	for n := range deltas {
		i := (n * 7919) % m.Workloads
		w := m.Workload(i, 1) // a restart in place: same UID, new address
		t := time.Now()
		ads.push <- &discoveryv3.DeltaDiscoveryResponse{TypeUrl: xds.AddressType, Nonce: fmt.Sprint("d", n), Resources: []*discoveryv3.Resource{xdsWorkload(w)}}
		if err := waitFor(ctx, func() bool {
			got, ok := st.Current().WorkloadByIP("", w.WorkloadIPs[0])
			return ok && got.UID == w.UID
		}); err != nil {
			return nil, fmt.Errorf("xds: delta %d: %w (%v)", n, err, p.LastError())
		}
		visible = append(visible, time.Since(t))
	}
	r.Deltas = len(visible)
	if r.Deltas > 0 {
		r.CPUPerDeltaS = (cpuTime() - cpu0).Seconds() / float64(r.Deltas)
	}
	r.VisibleP50Ms, r.VisibleMaxMs = us(pct(visible, 50))/1000, us(pct(visible, 100))/1000
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
	fmt.Fprintf(&b, "| istiod provider (pkg/config/xds, as committed): first push applied | %.2f s wall, %.2f s CPU, %.0f MiB live heap |\n",
		x.InitialWallS, x.InitialCPUS, x.HeapMiB)
	fmt.Fprintf(&b, "| istiod provider: one-workload delta visible p50 / max, CPU per delta | %.1f / %.1f ms, %.3f s over %d deltas |\n",
		x.VisibleP50Ms, x.VisibleMaxMs, x.CPUPerDeltaS, x.Deltas)
	return b.String()
}
