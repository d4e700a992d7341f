package ztunnel

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/policy"
)

// errStrict reports plaintext refused by a STRICT peer-authentication mode.
var errStrict = errors.New("plaintext refused: peer authentication is STRICT")

// handlePlaintext serves a connection from outside the mesh that sk_lookup
// steered to the pod's 15006: its local address is the original destination.
func (p *Proxy) handlePlaintext(pd *pod, c *net.TCPConn) {
	rec := &connRecord{
		direction: "inbound_plaintext",
		start:     time.Now(),
		src:       unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort()),
		dst:       unmap(c.LocalAddr().(*net.TCPAddr).AddrPort()),
	}
	rec.labels.reporter = reporterDestination
	rec.labels.securityPolicy = securityUnknown
	if isOwnTransparent(rec.src, rec.dst) {
		// The agent's own connect to the app, steered here because BPF
		// could not record it (err_transparent): refuse, never dial again.
		p.log.Error("own transparent connect steered to the inbound listener; refused", "src", rec.src.String(), "dst", rec.dst.String())
		reset(c)
		return
	}
	snap := p.deps.Store.Current()
	dstW, ok := snap.WorkloadByUID(pd.workload().UID)
	if !ok {
		reset(c)
		return
	}
	rec.labels.dstWorkload, rec.labels.dstNamespace, rec.labels.dstPrincipal = workloadLabels(dstW)
	if src, ok := snap.WorkloadByIP(dstW.Network, rec.src.Addr()); ok {
		rec.labels.srcWorkload, rec.labels.srcNamespace, _ = workloadLabels(src)
	}
	if snap.MTLSMode(dstW) == config.MTLSStrict {
		rec.labels.responseFlags, rec.err = flagDenied, errStrict
		p.failed(rec)
		reset(c)
		return
	}
	authz := policy.Conn{SrcIP: rec.src.Addr(), DstIP: rec.dst.Addr(), DstPort: rec.dst.Port()}
	up, err := p.admit(context.Background(), pd, snap, dstW, authz, rec)
	if err != nil {
		reset(c)
		return
	}
	hbone.Relay(c, up)
}
