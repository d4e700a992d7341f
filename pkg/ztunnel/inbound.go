package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/policy"
)

// serveHBONE authorizes a tunnel that arrived on the pod's 15008 and connects
// it to the app inside the pod. The HBONE server relays the returned
// connection and closes it; closing it is when the connection is accounted.
func (pd *pod) serveHBONE(ctx context.Context, req *hbone.ServerRequest) (net.Conn, error) {
	p := pd.proxy
	snap := p.deps.Store.Current()
	rec := &connRecord{direction: "inbound", start: time.Now(), dst: req.Authority, src: clientAddr(req),
		traceID: TraceID(req.Headers)}
	rec.labels.reporter = reporterDestination
	rec.labels.securityPolicy = securityMutualTLS
	rec.labels.srcPrincipal = req.Peer.String()
	dstW, ok := snap.WorkloadByUID(pd.workload().UID)
	if ok {
		if src, found := snap.WorkloadByIP(dstW.Network, rec.src.Addr()); found && src.Identity() == req.Peer.String() {
			rec.labels.srcWorkload, rec.labels.srcNamespace, _ = workloadLabels(src)
		}
	}
	if rec.labels.srcNamespace == "" {
		rec.labels.srcNamespace = namespaceOf(req.Peer.Path())
	}
	if !ok || !dstW.HasIP(req.Authority.Addr()) {
		// The tunnel reached this pod but names another destination.
		err := fmt.Errorf("authority %s is not an address of %s", req.Authority, pd.workload())
		rec.labels.responseFlags, rec.err = flagConnect, err
		p.failed(rec)
		return nil, &hbone.StatusError{Code: http.StatusBadRequest, Err: err}
	}
	rec.labels.dstWorkload, rec.labels.dstNamespace, rec.labels.dstPrincipal = workloadLabels(dstW)
	// The app sees the tunnel's source as the client: it must be a workload
	// of the peer's identity (the Forwarded header is never trusted for it).
	if err := verifySource(snap, dstW.Network, rec.src.Addr(), req.Peer.String()); err != nil {
		rec.labels.responseFlags, rec.err = flagDenied, err
		p.deps.Metrics.sourceMismatch()
		p.failed(rec)
		return nil, &hbone.StatusError{Code: http.StatusUnauthorized, Err: err}
	}
	authz := policy.Conn{SrcIdentity: req.Peer.String(), SrcIP: rec.src.Addr(), DstIP: req.Authority.Addr(), DstPort: req.Authority.Port()}
	up, err := p.admit(ctx, pd, snap, dstW, authz, rec)
	if err != nil {
		return nil, err
	}
	return up, nil
}

// admit authorizes an inbound connection and dials the app; the returned
// connection accounts the bytes and logs the record when it closes.
func (p *Proxy) admit(ctx context.Context, pd *pod, snap *config.Snapshot, dstW *config.Workload, authz policy.Conn, rec *connRecord) (*accountedConn, error) {
	if d := policy.Authorize(snap, dstW, authz); !d.Allowed {
		rec.labels.responseFlags, rec.reason = flagDenied, d.String()
		p.failed(rec)
		return nil, fmt.Errorf("%s: %w", d.String(), hbone.ErrDenied)
	}
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	// Dial the app from the client's address (transparent.go), or from the
	// pod's own where the pod cannot preserve sources. sk_lookup steers
	// neither back to the agent.
	up, err := p.dialApp(dctx, pd, authz.SrcIP, netip.AddrPortFrom(authz.DstIP, authz.DstPort))
	if err != nil {
		rec.labels.responseFlags, rec.err = flagConnect, err
		p.failed(rec)
		return nil, fmt.Errorf("connect to app %s: %w", net.JoinHostPort(authz.DstIP.String(), fmt.Sprint(authz.DstPort)), err)
	}
	p.deps.Metrics.open(rec.labels)
	a := &accountedConn{TCPConn: up, rec: rec, t: &tracked{pod: pd, authz: &authz, end: up}}
	p.trackConn(a.t)
	return a, nil
}

// accountedConn is an upstream connection to an app that counts what the
// relay moves and reports the connection when the relay closes it.
type accountedConn struct {
	*net.TCPConn
	rec     *connRecord
	t       *tracked
	read    atomic.Int64 // from the app: sent to the client
	written atomic.Int64 // to the app: received from the client
	aborted atomic.Bool  // the relay ended in error
	once    sync.Once
}

// errRelayAborted is the error of an inbound relay that ended in error: the
// relay aborts both sides and does not say more to the upstream.
var errRelayAborted = errors.New("relay aborted: a side reset or broke the connection")

func (a *accountedConn) Read(b []byte) (int, error) {
	n, err := a.TCPConn.Read(b)
	a.read.Add(int64(n))
	return n, err
}

func (a *accountedConn) Write(b []byte) (int, error) {
	n, err := a.TCPConn.Write(b)
	a.written.Add(int64(n))
	return n, err
}

// Abort resets the app's connection (the relay calls it when either side
// failed, e.g. the client reset its side), so an interrupted upload never
// looks complete to the app.
func (a *accountedConn) Abort() error {
	a.aborted.Store(true)
	a.TCPConn.SetLinger(0)
	return a.TCPConn.Close()
}

// Close closes the upstream and reports the connection once. The relay
// calls it after both directions have finished, so the counters are final.
func (a *accountedConn) Close() error {
	err := a.TCPConn.Close()
	a.once.Do(func() {
		p := a.t.pod.proxy
		p.untrack(a.t)
		a.rec.received, a.rec.sent = a.written.Load(), a.read.Load()
		var relayErr error
		if a.aborted.Load() {
			relayErr = errRelayAborted
		}
		p.finished(a.rec, a.t, relayErr)
	})
	return err
}

// clientAddr returns the client's address: the tunnel's source address,
// which the source agent binds to the client pod's IP. The Forwarded header
// (for="ip:port", set by the source agent) only contributes the client's
// port, and only when it names the same IP: a peer cannot choose the
// address that authorization sees.
func clientAddr(req *hbone.ServerRequest) netip.AddrPort {
	remote := unmap(req.RemoteAddr)
	for _, v := range req.Headers.Values("Forwarded") {
		for _, part := range strings.Split(v, ";") {
			k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
			if !ok || !strings.EqualFold(k, "for") {
				continue
			}
			if ap, err := netip.ParseAddrPort(strings.Trim(val, `"`)); err == nil && ap.Addr().Unmap() == remote.Addr() {
				return netip.AddrPortFrom(remote.Addr(), ap.Port())
			}
		}
	}
	return remote
}

// namespaceOf returns the namespace of a SPIFFE path /ns/<ns>/sa/<sa>.
func namespaceOf(path string) string {
	parts := strings.Split(strings.TrimPrefix(path, "/"), "/")
	if len(parts) >= 2 && parts[0] == "ns" {
		return parts[1]
	}
	return ""
}
