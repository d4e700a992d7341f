package ztunnel

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/policy"
)

// tracked is an open connection the proxy can end: at the drain deadline,
// when its workload leaves, and (inbound) when a policy change no longer
// allows it.
type tracked struct {
	pod *pod
	// authz is what authorization saw; nil for outbound connections,
	// which the destination re-checks.
	authz *policy.Conn
	// end is the connection whose deadline ends the relay: setting it in
	// the past makes the relay's read fail, and the relay then resets both
	// sides (RST to TCP peers, RST_STREAM to HBONE peers), so an idle client
	// learns at once that its connection is gone.
	end net.Conn
	// why is the first reason the proxy ended the connection, nil while it
	// has not.
	why atomic.Pointer[revocation]
}

// revocation is why the proxy ended an open connection.
type revocation struct {
	err    error  // one of the errRevoked* values
	reason string // the policy decision, for errRevokedPolicy
}

// Reasons the proxy ends an open connection, in its access-log line.
var (
	// errRevokedPolicy is ztunnel's AuthorizationPolicyLateRejection: its
	// connection closes with response_flags DENY.
	errRevokedPolicy = errors.New("connection closed due to policy change")
	// errRevokedDrain and errRevokedRemoved end a connection without a
	// response flag, as ztunnel's drain (ClosedFromDrain) does.
	errRevokedDrain   = errors.New("connection reset at the drain deadline")
	errRevokedRemoved = errors.New("connection reset: its workload was removed")
)

// revoke ends the connection's relay abruptly; the first reason given is
// the one accounted.
func (t *tracked) revoke(err error, reason string) {
	t.why.CompareAndSwap(nil, &revocation{err: err, reason: reason})
	t.end.SetDeadline(time.Unix(1, 0))
}

// trackConn records an open connection until untrack.
func (p *Proxy) trackConn(t *tracked) {
	p.mu.Lock()
	p.conns[t] = struct{}{}
	p.mu.Unlock()
}

func (p *Proxy) untrack(t *tracked) {
	p.mu.Lock()
	delete(p.conns, t)
	p.mu.Unlock()
}

// openConns copies the tracked connections that match keep.
func (p *Proxy) openConns(keep func(*tracked) bool) []*tracked {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*tracked
	for t := range p.conns {
		if keep(t) {
			out = append(out, t)
		}
	}
	return out
}

// recheck resets the open inbound connections that snap's policies no longer allow.
func (p *Proxy) recheck(snap *config.Snapshot) {
	conns := p.openConns(func(t *tracked) bool { return t.authz != nil })
	closed := 0
	for _, c := range conns {
		dst, ok := snap.WorkloadByUID(c.pod.workload().UID)
		if !ok {
			continue // the workload's removal ends its connections
		}
		if d := policy.Authorize(snap, dst, *c.authz); !d.Allowed {
			p.log.Info("resetting connection no longer allowed", "src", c.authz.SrcIdentity, "src_ip", c.authz.SrcIP.String(),
				"dst", netip.AddrPortFrom(c.authz.DstIP, c.authz.DstPort).String(), "decision", d.String())
			c.revoke(errRevokedPolicy, d.String())
			closed++
		}
	}
	if closed > 0 {
		p.log.Info("policy change re-checked open connections", "checked", len(conns), "reset", closed)
	}
}

// closeConnsOf resets the connections of a removed workload.
func (p *Proxy) closeConnsOf(pd *pod) {
	for _, c := range p.openConns(func(t *tracked) bool { return t.pod == pd }) {
		c.revoke(errRevokedRemoved, "")
	}
}

// connRecord is what the access log and metrics say of one connection.
type connRecord struct {
	labels    connLabelValues
	direction string // outbound, inbound, inbound_plaintext
	src, dst  netip.AddrPort
	hbone     netip.AddrPort // the tunnel endpoint, outbound HBONE only
	start     time.Time
	received  int64 // from the client
	sent      int64 // to the client
	err       error
	reason    string
	traceID   string // from the CONNECT's traceparent (tracing.go)
	sameNode  bool   // carried by the same-node fast path (samenode.go)
}

// failed accounts a connection that never got through and logs it.
func (p *Proxy) failed(r *connRecord) {
	p.deps.Metrics.fail(r.labels)
	p.logClose(r)
}

// finished accounts a relayed connection that has ended, with ztunnel's
// flags for how it ended: DENY when a policy change revoked it, none when
// the drain deadline or its workload's removal did (ztunnel's drain), and
// CONNECT when the relay ended in error (a reset, a broken connection),
// which ztunnel's ConnectionResult infers from the copy's error. r.received
// and r.sent must be final.
func (p *Proxy) finished(r *connRecord, t *tracked, relayErr error) {
	flags := ""
	why := t.why.Load()
	if why == nil && relayErr != nil {
		// Ended by the proxy all the same: the HBONE server closes its
		// streams when its workload leaves and at the drain deadline,
		// possibly before the connection is revoked.
		if t.pod.removed.Load() {
			why = &revocation{err: errRevokedRemoved}
		} else if p.drainExpired() {
			why = &revocation{err: errRevokedDrain}
		}
	}
	switch {
	case why != nil && why.err == errRevokedPolicy:
		flags, r.err, r.reason = flagDenied, why.err, why.reason
	case why != nil:
		r.err = why.err
	case relayErr != nil:
		flags, r.err = flagConnect, relayErr
	}
	p.deps.Metrics.close(r.labels, flags, r.received, r.sent)
	r.labels.responseFlags = flags
	p.logClose(r)
}

// logClose writes the connection's access-log record.
func (p *Proxy) logClose(r *connRecord) {
	if p.deps.AccessLog == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("direction", r.direction),
		slog.String("reporter", r.labels.reporter),
		slog.String("src.addr", r.src.String()),
		slog.String("src.workload", r.labels.srcWorkload),
		slog.String("src.namespace", r.labels.srcNamespace),
		slog.String("src.identity", r.labels.srcPrincipal),
		slog.String("dst.addr", r.dst.String()),
		slog.String("dst.workload", r.labels.dstWorkload),
		slog.String("dst.namespace", r.labels.dstNamespace),
		slog.String("dst.identity", r.labels.dstPrincipal),
		slog.String("dst.service", r.labels.dstService),
		slog.String("security", r.labels.securityPolicy),
		slog.Int64("bytes_received", r.received),
		slog.Int64("bytes_sent", r.sent),
		slog.Float64("duration_ms", float64(time.Since(r.start).Microseconds())/1000),
	}
	if r.hbone.IsValid() {
		attrs = append(attrs, slog.String("hbone.addr", r.hbone.String()))
	}
	if r.sameNode {
		attrs = append(attrs, slog.Bool("same_node", true))
	}
	if r.traceID != "" {
		attrs = append(attrs, slog.String("trace_id", r.traceID))
	}
	if r.labels.responseFlags != "" {
		attrs = append(attrs, slog.String("response_flags", r.labels.responseFlags))
	}
	if r.reason != "" {
		attrs = append(attrs, slog.String("reason", r.reason))
	}
	if r.err != nil {
		attrs = append(attrs, slog.String("error", r.err.Error()))
	}
	p.deps.AccessLog.LogAttrs(context.Background(), slog.LevelInfo, "connection closed", attrs...)
}

// workloadLabels fills the source or destination labels from a workload.
func workloadLabels(w *config.Workload) (name, namespace, principal string) {
	if w == nil {
		return "", "", ""
	}
	name = w.WorkloadName()
	if name == "" {
		name = w.Name
	}
	return name, w.Namespace, w.Identity()
}
