package ztunnel

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/policy"
)

// trackedConn is an open inbound connection: its upstream socket to the app,
// and what authorization saw, so a policy change can re-check it.
type trackedConn struct {
	net.Conn // the upstream connection to the app
	pod      *pod
	authz    policy.Conn
	once     sync.Once
	closed   chan struct{}
}

// register records an inbound connection for policy re-checks and forced drain.
func (p *Proxy) register(pd *pod, up net.Conn, authz policy.Conn) *trackedConn {
	tc := &trackedConn{Conn: up, pod: pd, authz: authz, closed: make(chan struct{})}
	p.mu.Lock()
	p.conns[tc] = struct{}{}
	p.mu.Unlock()
	return tc
}

// Close closes the upstream connection once and forgets it.
func (tc *trackedConn) Close() error {
	var err error
	tc.once.Do(func() {
		err = tc.Conn.Close()
		p := tc.pod.proxy
		p.mu.Lock()
		delete(p.conns, tc)
		p.mu.Unlock()
		close(tc.closed)
	})
	return err
}

// CloseWrite passes a half-close on to the app.
func (tc *trackedConn) CloseWrite() error {
	if cw, ok := tc.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// recheck closes the open inbound connections that snap's policies no longer allow.
func (p *Proxy) recheck(snap *config.Snapshot) {
	p.mu.Lock()
	conns := make([]*trackedConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	closed := 0
	for _, c := range conns {
		dst, ok := snap.WorkloadByUID(c.pod.workload().UID)
		if !ok {
			continue // the workload's removal closes its connections
		}
		if d := policy.Authorize(snap, dst, c.authz); !d.Allowed {
			p.log.Info("closing connection no longer allowed", "src", c.authz.SrcIdentity, "src_ip", c.authz.SrcIP.String(),
				"dst", netip.AddrPortFrom(c.authz.DstIP, c.authz.DstPort).String(), "decision", d.String())
			c.Close()
			closed++
		}
	}
	if closed > 0 {
		p.log.Info("policy change re-checked open connections", "checked", len(conns), "closed", closed)
	}
}

// closeConnsOf closes the inbound connections of a removed workload.
func (p *Proxy) closeConnsOf(pd *pod) {
	p.mu.Lock()
	var conns []*trackedConn
	for c := range p.conns {
		if c.pod == pd {
			conns = append(conns, c)
		}
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
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
	name = w.WorkloadName
	if name == "" {
		name = w.Name
	}
	return name, w.Namespace, w.Identity()
}
