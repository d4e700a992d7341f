package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
)

// dialTimeout bounds opening the upstream side of a connection.
const dialTimeout = 10 * time.Second

// route is where an outbound connection goes.
type route struct {
	svc  *config.Service
	dst  *config.Workload // nil: not in the mesh's view, plain passthrough
	addr netip.AddrPort   // the destination workload's address and target port
}

// resolve maps an original destination to a service endpoint or a workload.
func (p *Proxy) resolve(snap *config.Snapshot, src *config.Workload, orig netip.AddrPort) (route, error) {
	if svc, ok := snap.ServiceByVIP(src.Network, orig); ok {
		ch, err := p.deps.Balancer.Pick(snap, svc, orig, src.Locality)
		if err != nil {
			return route{svc: svc}, fmt.Errorf("%s: %w", svc.Hostname, err)
		}
		return route{svc: svc, dst: ch.Workload(), addr: ch.Addr}, nil
	}
	if w, ok := snap.WorkloadByIP(src.Network, orig.Addr()); ok {
		return route{dst: w, addr: orig}, nil
	}
	return route{addr: orig}, nil
}

// addrOfFamily picks w's address of the same family as like, else its first.
func addrOfFamily(w *config.Workload, like netip.Addr) (netip.Addr, bool) {
	for _, ip := range w.WorkloadIPs {
		if ip.Is4() == like.Is4() {
			return ip, true
		}
	}
	if len(w.WorkloadIPs) > 0 {
		return w.WorkloadIPs[0], true
	}
	return netip.Addr{}, false
}

// handleOutbound serves a connection captured from the pod on 15001.
func (p *Proxy) handleOutbound(pd *pod, c *net.TCPConn) {
	rec := &connRecord{direction: "outbound", start: time.Now(), src: unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort())}
	src := pd.workload()
	rec.labels.reporter = reporterSource
	rec.labels.srcWorkload, rec.labels.srcNamespace, rec.labels.srcPrincipal = workloadLabels(src)
	orig, err := p.deps.Capture.OriginalDst(c)
	if err != nil {
		rec.labels.responseFlags, rec.err = flagNoOrigDst, err
		p.failed(rec)
		reset(c)
		return
	}
	orig = unmap(orig)
	rec.dst = orig
	// The client's own address is the pod's (loopback only inside it).
	if ip, ok := addrOfFamily(src, orig.Addr()); ok {
		rec.src = netip.AddrPortFrom(ip, rec.src.Port())
	}
	snap := p.deps.Store.Current()
	rt, err := p.resolve(snap, src, orig)
	if rt.svc != nil {
		rec.labels.dstService, rec.labels.dstServiceName, rec.labels.dstServiceNS = rt.svc.Hostname, rt.svc.Name, rt.svc.Namespace
	}
	if err != nil {
		rec.labels.responseFlags, rec.err = flagNoHealthy, err
		p.failed(rec)
		reset(c)
		return
	}
	rec.labels.dstWorkload, rec.labels.dstNamespace, rec.labels.dstPrincipal = workloadLabels(rt.dst)
	rec.dst = rt.addr

	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	var up net.Conn
	if rt.dst != nil && rt.dst.Protocol == config.ProtocolHBONE {
		rec.labels.securityPolicy = securityMutualTLS
		rec.hbone = netip.AddrPortFrom(rt.addr.Addr(), p.deps.HBONEPort)
		up, err = p.dialHBONE(ctx, pd, rt, rec)
	} else {
		// Plain TCP: no identity of the source's is presented (as ztunnel reports it).
		rec.labels.securityPolicy, rec.labels.srcPrincipal = securityUnknown, ""
		up, err = p.dialIn(ctx, pd, netip.Addr{}, rt.addr)
	}
	cancel()
	if err != nil {
		rec.labels.responseFlags, rec.err = dialFailureFlag(err), err
		p.failed(rec)
		reset(c)
		return
	}
	p.deps.Metrics.open(rec.labels)
	t := &tracked{pod: pd, end: c}
	p.trackConn(t)
	res := hbone.Relay(c, up)
	p.untrack(t)
	rec.received, rec.sent = res.AToB, res.BToA
	p.finished(rec, t, res.Err)
}

// dialFailureFlag is the response flag of an outbound connection whose
// upstream could not be opened, as ztunnel's ConnectionResult infers it from
// the error: NETWORK_POLICY when the TCP connect to the HBONE port timed
// out, otherwise CONNECT, including a CONNECT the destination refused (even
// 401: the destination reports that denial as DENY).
func dialFailureFlag(err error) string {
	if errors.Is(err, errTunnelTimeout) {
		return flagNetworkPolicy
	}
	return flagConnect
}

// dialHBONE opens a tunnel from the source pod to the destination workload's
// node agent, expecting the workload's identity or one of the service's SANs.
func (p *Proxy) dialHBONE(ctx context.Context, pd *pod, rt route, rec *connRecord) (net.Conn, error) {
	expected, err := expectedIDs(rt)
	if err != nil {
		return nil, err
	}
	srcIP := pd.srcAddr(rt.addr.Addr())
	if !srcIP.IsValid() {
		return nil, fmt.Errorf("workload %s has no IPv%d address to reach %s from", pd.workload(), map[bool]int{true: 4, false: 6}[rt.addr.Addr().Is4()], rt.addr)
	}
	req := hbone.Request{
		Source:    pd.id.SPIFFEID(),
		Expected:  expected,
		Addr:      rec.hbone,
		SourceIP:  srcIP,
		Authority: rt.addr,
		Headers:   http.Header{"Forwarded": {fmt.Sprintf("for=%q", rec.src.String())}},
	}
	var tp string
	tp, rec.traceID = newTraceparent()
	req.Headers.Set(headerTraceparent, tp)
	if bg := baggage(pd.workload()); bg != "" {
		req.Headers.Set(headerBaggage, bg)
	}
	s, err := p.deps.Tunnels.Dial(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("HBONE to %s via %s: %w", rt.addr, rec.hbone, err)
	}
	return s, nil
}

func expectedIDs(rt route) ([]spiffeid.ID, error) {
	id, err := spiffeid.FromString(rt.dst.Identity())
	if err != nil {
		return nil, fmt.Errorf("identity of %s: %w", rt.dst, err)
	}
	ids := []spiffeid.ID{id}
	if rt.svc != nil {
		for _, san := range rt.svc.SubjectAltNames {
			sid, err := spiffeid.FromString(san)
			if err != nil {
				// Istio writes SANs without the scheme.
				if sid, err = spiffeid.FromString("spiffe://" + san); err != nil {
					return nil, fmt.Errorf("service %s subjectAltName %q: %w", rt.svc.Hostname, san, err)
				}
			}
			ids = append(ids, sid)
		}
	}
	return ids, nil
}
