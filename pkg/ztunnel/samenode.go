package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/policy"
)

// The same-node fast path (Deps.SameNodeFastPath): a captured connection
// whose destination is a pod this agent enrolled and serves skips TLS and
// HTTP/2. The agent plays both agents' parts in one handler: the source's
// (route, outbound record) and the destination's (authority check, source
// check, authorization, dial of the app from the client's address, inbound
// record), then relays the client's socket and the app's with splice(2).
//
// Why it grants nothing HBONE would not: the source identity an HBONE tunnel
// proves is the certificate this same agent holds for the source pod and
// presents for any connection accepted on that pod's 15001, a listener that
// exists only inside the pod's network namespace, where capture (cgroup
// connect hook, original destination recorded by BPF) sent the connection.
// The fast path takes exactly that identity from exactly that acceptance,
// and the destination's checks run on it unchanged; the agent already holds
// both pods' private keys, so no party that could not forge the tunnel can
// forge the shortcut. The bytes move between two sockets of the node's
// kernel (a pipe in between), never on an interface, so there is nothing
// for TLS to protect them from that it protected them from on the node.
// PeerAuthentication STRICT admits the path for the same reason it admits
// HBONE: the source is a mesh identity the agent authenticated. Anything
// else takes HBONE as before: a waypoint on the route (resolve decides
// first), a destination this agent does not serve, or one whose enrolled
// identity the source would not accept from the tunnel's peer.

// sameNodePeer returns the local pod serving rt's destination when the fast
// path may carry the connection.
func (p *Proxy) sameNodePeer(rt route) (*pod, bool) {
	if !p.deps.SameNodeFastPath || rt.waypoint != nil || rt.dst == nil || rt.dst.Protocol != config.ProtocolHBONE {
		return nil, false
	}
	p.mu.Lock()
	dpd, ok := p.pods[rt.dst.UID]
	p.mu.Unlock()
	if !ok || dpd.removed.Load() {
		return nil, false
	}
	// The identity the destination's HBONE server would present must be
	// one the source expects of the tunnel's peer, as the TLS handshake
	// would check it.
	want, err := expectedIDs(rt)
	if err != nil || !slices.Contains(want, dpd.id.SPIFFEID()) {
		return nil, false
	}
	return dpd, true
}

// serveSameNode carries an outbound connection from pd to the local pod dpd
// (sameNodePeer). rec is the source's record, routed to rt.
func (p *Proxy) serveSameNode(pd, dpd *pod, c *net.TCPConn, snap *config.Snapshot, rt route, rec *connRecord) {
	rec.labels.securityPolicy = securityMutualTLS
	rec.sameNode = true
	fail := func(err error) {
		rec.labels.responseFlags, rec.err = flagConnect, fmt.Errorf("same-node to %s: %w", rt.addr, err)
		p.failed(rec)
		reset(c)
	}
	srcIP := pd.srcAddr(rt.addr.Addr())
	if !srcIP.IsValid() {
		fail(fmt.Errorf("workload %s has no IPv%d address to reach %s from", pd.workload(), map[bool]int{true: 4, false: 6}[rt.addr.Addr().Is4()], rt.addr))
		return
	}
	srcID := pd.id.SPIFFEID().String()

	// The destination's part, as serveHBONE does it for a tunnel from srcIP
	// authenticated as srcID, with the client's port as Forwarded gives it.
	in := &connRecord{direction: "inbound", start: time.Now(), src: netip.AddrPortFrom(srcIP, rec.src.Port()), dst: rt.addr, sameNode: true}
	_, in.traceID = newTraceparent()
	rec.traceID = in.traceID
	in.labels.reporter = reporterDestination
	in.labels.securityPolicy = securityMutualTLS
	in.labels.srcPrincipal = srcID
	dstW, ok := snap.WorkloadByUID(dpd.workload().UID)
	if ok {
		if src, found := snap.WorkloadByIP(dstW.Network, srcIP); found && src.Identity() == srcID {
			in.labels.srcWorkload, in.labels.srcNamespace, _ = workloadLabels(src)
		}
	}
	if in.labels.srcNamespace == "" {
		in.labels.srcNamespace = namespaceOf(pd.id.SPIFFEID().Path())
	}
	if !ok || !dstW.HasIP(rt.addr.Addr()) {
		err := fmt.Errorf("authority %s is not an address of %s", rt.addr, dpd.workload())
		in.labels.responseFlags, in.err = flagConnect, err
		p.failed(in)
		fail(err)
		return
	}
	in.labels.dstWorkload, in.labels.dstNamespace, in.labels.dstPrincipal = workloadLabels(dstW)
	if err := verifySource(snap, dstW.Network, srcIP, srcID); err != nil {
		in.labels.responseFlags, in.err = flagDenied, err
		p.deps.Metrics.sourceMismatch()
		p.failed(in)
		fail(err)
		return
	}
	authz := policy.Conn{SrcIdentity: srcID, SrcIP: srcIP, DstIP: rt.addr.Addr(), DstPort: rt.addr.Port()}
	up, err := p.admit(context.Background(), dpd, snap, dstW, authz, in)
	if err != nil {
		fail(err)
		return
	}

	p.deps.Metrics.open(rec.labels)
	t := &tracked{pod: pd, end: c}
	p.trackConn(t)
	res := relayTCP(c, up.TCPConn)
	p.untrack(t)
	up.written.Store(res.AToB)
	up.read.Store(res.BToA)
	up.aborted.Store(res.Err != nil)
	up.Close() // accounts the destination's side
	rec.received, rec.sent = res.AToB, res.BToA
	p.finished(rec, t, res.Err)
}

// relayTCP copies between two TCP connections both ways until both
// directions end, as hbone.Relay does (EOF half-closes the other side, an
// error resets both), and closes them. Each direction is one
// (*net.TCPConn).ReadFrom of the other connection, which Go runs as
// splice(2) through a pipe on Linux: the bytes never enter user space.
func relayTCP(a, b *net.TCPConn) hbone.RelayResult {
	var res hbone.RelayResult
	var errBA error
	done := make(chan struct{})
	go func() {
		defer close(done)
		res.BToA, errBA = spliceHalf(a, b)
		if errBA != nil {
			reset(a)
			reset(b)
		}
	}()
	var errAB error
	res.AToB, errAB = spliceHalf(b, a)
	if errAB != nil {
		reset(a)
		reset(b)
	}
	<-done
	res.Err = errors.Join(errAB, errBA)
	a.Close()
	b.Close()
	return res
}

// spliceHalf copies src to dst until EOF, then half-closes dst.
func spliceHalf(dst, src *net.TCPConn) (int64, error) {
	n, err := dst.ReadFrom(src)
	if err != nil {
		if errors.Is(err, net.ErrClosed) {
			return n, nil // closed by the other direction's reset
		}
		return n, err
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.ENOTCONN) {
		return n, err
	}
	return n, nil
}
