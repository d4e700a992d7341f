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
	addr netip.AddrPort   // the destination workload's address and target port; through a waypoint, the original destination
	// waypoint, when set, is where the connection goes instead: over HBONE
	// to the waypoint, addr as the authority (dst is then the waypoint's
	// workload when addressed directly, nil when addressed by service).
	waypoint *waypointRoute
}

// waypointRoute is the waypoint workload a connection is sent to.
type waypointRoute struct {
	w     *config.Workload // the waypoint's workload
	svc   *config.Service  // the waypoint's service, when it is addressed by one
	hbone netip.AddrPort   // the waypoint workload's address and HBONE port
}

// errUnknownWaypoint is a waypoint that resolves to no workload: what it
// fronts gets no traffic (fail closed, never straight to the destination).
var errUnknownWaypoint = errors.New("unknown waypoint")

// resolve maps an original destination to a service endpoint, a workload,
// or the waypoint of either. A service's waypoint takes its VIP traffic; a
// workload's waypoint takes the traffic to the workload's own addresses (as
// ztunnel: traffic to a service never consults its endpoints' waypoints).
func (p *Proxy) resolve(snap *config.Snapshot, src *config.Workload, orig netip.AddrPort) (route, error) {
	if svc, ok := snap.ServiceByVIP(src.Network, orig); ok {
		if svc.Waypoint != nil && !isWaypoint(snap, src, svc.Waypoint) {
			wp, err := p.resolveWaypoint(snap, src, svc.Waypoint, orig.Addr())
			if err != nil {
				return route{svc: svc}, fmt.Errorf("%s: waypoint %s: %w", svc.Hostname, svc.Waypoint, err)
			}
			return route{svc: svc, addr: orig, waypoint: wp}, nil
		}
		ch, err := p.deps.Balancer.Pick(snap, svc, orig, src)
		if err != nil {
			return route{svc: svc}, fmt.Errorf("%s: %w", svc.Hostname, err)
		}
		return route{svc: svc, dst: ch.Workload(), addr: ch.Addr}, nil
	}
	if w, ok := snap.WorkloadByIP(src.Network, orig.Addr()); ok {
		if w.Waypoint != nil && !isWaypoint(snap, src, w.Waypoint) {
			wp, err := p.resolveWaypoint(snap, src, w.Waypoint, orig.Addr())
			if err != nil {
				return route{dst: w}, fmt.Errorf("%s: waypoint %s: %w", w, w.Waypoint, err)
			}
			return route{dst: w, addr: orig, waypoint: wp}, nil
		}
		return route{dst: w, addr: orig}, nil
	}
	return route{addr: orig}, nil
}

// resolveWaypoint finds the workload behind a waypoint: the workload of its
// address, or an endpoint of its service (by VIP or hostname) on its HBONE
// port, picked like any service endpoint.
func (p *Proxy) resolveWaypoint(snap *config.Snapshot, src *config.Workload, wp *config.Waypoint, like netip.Addr) (*waypointRoute, error) {
	var svc *config.Service
	switch {
	case wp.Address.Addr.IsValid():
		if w, ok := snap.WorkloadByIP(wp.Address.Network, wp.Address.Addr); ok {
			return &waypointRoute{w: w, hbone: netip.AddrPortFrom(wp.Address.Addr, wp.Port())}, nil
		}
		s, ok := snap.ServiceByAddr(wp.Address.Network, wp.Address.Addr)
		if !ok {
			return nil, fmt.Errorf("%w: no workload or service has address %s", errUnknownWaypoint, wp.Address)
		}
		svc = s
	default:
		s, ok := snap.ServiceByKey(wp.Service)
		if !ok {
			return nil, fmt.Errorf("%w: service %s is not known", errUnknownWaypoint, wp.Service)
		}
		svc = s
	}
	vip := netip.AddrPortFrom(wp.Address.Addr, wp.Port())
	if !vip.Addr().IsValid() && len(svc.VIPs) > 0 {
		vip = netip.AddrPortFrom(svc.VIPs[0].Addr, wp.Port())
	}
	ch, err := p.deps.Balancer.Pick(snap, svc, vip, src)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errUnknownWaypoint, err)
	}
	hb := ch.Addr
	if ip, ok := addrOfFamily(ch.Workload(), like); ok && ip != hb.Addr() {
		hb = netip.AddrPortFrom(ip, hb.Port())
	}
	return &waypointRoute{w: ch.Workload(), svc: svc, hbone: hb}, nil
}

// isWaypoint reports whether src is (a workload of) the waypoint wp: its
// own traffic to what it fronts goes direct, or it would loop.
func isWaypoint(snap *config.Snapshot, src *config.Workload, wp *config.Waypoint) bool {
	if wp.Address.Addr.IsValid() {
		if src.Network == wp.Address.Network && src.HasIP(wp.Address.Addr) {
			return true
		}
		if svc, ok := snap.ServiceByAddr(wp.Address.Network, wp.Address.Addr); ok {
			_, backs := src.Services[svc.Key()]
			return backs
		}
		return false
	}
	_, backs := src.Services[wp.Service]
	return backs
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
		// No healthy endpoint, or a waypoint that resolves to no workload.
		rec.labels.responseFlags, rec.err = flagNoHealthy, err
		p.failed(rec)
		reset(c)
		return
	}
	rec.labels.dstWorkload, rec.labels.dstNamespace, rec.labels.dstPrincipal = workloadLabels(rt.dst)
	rec.dst = rt.addr

	if dpd, ok := p.sameNodePeer(rt); ok {
		p.serveSameNode(pd, dpd, c, snap, rt, rec) // samenode.go
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	var up net.Conn
	if rt.waypoint != nil {
		// As ztunnel reports it: the waypoint is the peer the connection reaches.
		rec.labels.dstWorkload, rec.labels.dstNamespace, rec.labels.dstPrincipal = workloadLabels(rt.waypoint.w)
		rec.labels.securityPolicy = securityMutualTLS
		rec.hbone = rt.waypoint.hbone
		up, err = p.dialHBONE(ctx, pd, rt, rec)
	} else if rt.dst != nil && rt.dst.Protocol == config.ProtocolHBONE {
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
// node agent, expecting the workload's identity or one of the service's SANs;
// or to the waypoint (rec.hbone), expecting the waypoint workload's identity
// or one of its service's SANs, with the original destination as authority.
func (p *Proxy) dialHBONE(ctx context.Context, pd *pod, rt route, rec *connRecord) (net.Conn, error) {
	expected, err := expectedIDs(rt)
	if err != nil {
		return nil, err
	}
	srcIP := pd.srcAddr(rec.hbone.Addr())
	if !srcIP.IsValid() {
		return nil, fmt.Errorf("workload %s has no IPv%d address to reach %s from", pd.workload(), map[bool]int{true: 4, false: 6}[rec.hbone.Addr().Is4()], rt.addr)
	}
	req := hbone.Request{
		Source:    pd.id.SPIFFEID(),
		Expected:  expected,
		Addr:      rec.hbone,
		SourceIP:  srcIP,
		Authority: rt.addr,
		Headers:   http.Header{"Forwarded": {fmt.Sprintf("for=%q", rec.src.String())}},
	}
	rec.traceID = SetTraceHeaders(req.Headers, pd.workload())
	s, err := p.deps.Tunnels.Dial(ctx, req)
	if err != nil {
		if rt.waypoint != nil {
			return nil, fmt.Errorf("HBONE to %s via waypoint %s at %s: %w", rt.addr, rt.waypoint.w, rec.hbone, err)
		}
		return nil, fmt.Errorf("HBONE to %s via %s: %w", rt.addr, rec.hbone, err)
	}
	return s, nil
}

// expectedIDs returns the identities the peer may prove: the destination
// workload's and its service's SANs, or, through a waypoint, the waypoint
// workload's and its own service's SANs (never the destination's: only the
// waypoint terminates the tunnel).
func expectedIDs(rt route) ([]spiffeid.ID, error) {
	w, svc := rt.dst, rt.svc
	if rt.waypoint != nil {
		w, svc = rt.waypoint.w, rt.waypoint.svc
	}
	id, err := spiffeid.FromString(w.Identity())
	if err != nil {
		return nil, fmt.Errorf("identity of %s: %w", w, err)
	}
	ids := []spiffeid.ID{id}
	if svc != nil {
		for _, san := range svc.SubjectAltNames {
			sid, err := spiffeid.FromString(san)
			if err != nil {
				// Istio writes SANs without the scheme.
				if sid, err = spiffeid.FromString("spiffe://" + san); err != nil {
					return nil, fmt.Errorf("service %s subjectAltName %q: %w", svc.Hostname, san, err)
				}
			}
			ids = append(ids, sid)
		}
	}
	return ids, nil
}
