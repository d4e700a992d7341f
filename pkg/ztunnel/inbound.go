package ztunnel

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
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
	rec := &connRecord{direction: "inbound", start: time.Now(), dst: req.Authority, src: forwardedFor(req)}
	rec.labels.reporter = reporterDestination
	rec.labels.securityPolicy = "mutual_tls"
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
		rec.labels.responseFlags, rec.err = flagNoOrigDst, err
		p.deps.Metrics.fail(rec.labels)
		p.logClose(rec)
		return nil, &hbone.StatusError{Code: http.StatusBadRequest, Err: err}
	}
	rec.labels.dstWorkload, rec.labels.dstNamespace, rec.labels.dstPrincipal = workloadLabels(dstW)
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
		p.deps.Metrics.fail(rec.labels)
		p.logClose(rec)
		return nil, fmt.Errorf("%s: %w", d.String(), hbone.ErrDenied)
	}
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	// Dial the app from the pod's own address: sk_lookup never steers a
	// pod's connections to itself, so this is not captured again.
	up, err := dialIn(dctx, pd.ns, netip.Addr{}, netip.AddrPortFrom(authz.DstIP, authz.DstPort))
	if err != nil {
		rec.labels.responseFlags, rec.err = flagConnectFail, err
		p.deps.Metrics.fail(rec.labels)
		p.logClose(rec)
		return nil, fmt.Errorf("connect to app %s: %w", net.JoinHostPort(authz.DstIP.String(), fmt.Sprint(authz.DstPort)), err)
	}
	p.deps.Metrics.open(rec.labels)
	return &accountedConn{trackedConn: p.register(pd, up, authz), rec: rec}, nil
}

// accountedConn is an upstream connection to an app that counts what the
// relay moves and reports the connection when it closes.
type accountedConn struct {
	*trackedConn
	rec      *connRecord
	read     int64 // from the app: sent to the client
	written  int64 // to the app: received from the client
	reported bool
}

func (a *accountedConn) Read(b []byte) (int, error) {
	n, err := a.trackedConn.Read(b)
	a.read += int64(n)
	return n, err
}

func (a *accountedConn) Write(b []byte) (int, error) {
	n, err := a.trackedConn.Write(b)
	a.written += int64(n)
	return n, err
}

// Close closes the upstream and reports the connection once. The relay calls
// it after both directions have finished, so the counters are final.
func (a *accountedConn) Close() error {
	err := a.trackedConn.Close()
	if !a.reported {
		a.reported = true
		a.rec.received, a.rec.sent = a.written, a.read
		p := a.pod.proxy
		p.deps.Metrics.close(a.rec.labels, a.rec.received, a.rec.sent)
		p.logClose(a.rec)
	}
	return err
}

// forwardedFor returns the client address from the Forwarded header the
// source agent sets (for="ip:port"), else the tunnel's remote address.
func forwardedFor(req *hbone.ServerRequest) netip.AddrPort {
	for _, v := range req.Headers.Values("Forwarded") {
		for _, part := range strings.Split(v, ";") {
			k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
			if !ok || !strings.EqualFold(k, "for") {
				continue
			}
			val = strings.Trim(val, `"`)
			if ap, err := netip.ParseAddrPort(val); err == nil {
				return unmap(ap)
			}
			if a, err := netip.ParseAddr(strings.Trim(val, "[]")); err == nil {
				return netip.AddrPortFrom(a.Unmap(), 0)
			}
		}
	}
	return unmap(req.RemoteAddr)
}

// namespaceOf returns the namespace of a SPIFFE path /ns/<ns>/sa/<sa>.
func namespaceOf(path string) string {
	parts := strings.Split(strings.TrimPrefix(path, "/"), "/")
	if len(parts) >= 2 && parts[0] == "ns" {
		return parts[1]
	}
	return ""
}
