package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/loader"
)

// pod is one enrolled local workload: its listeners, HBONE server and capture.
type pod struct {
	proxy  *Proxy
	w      atomic.Pointer[config.Workload]
	id     identity.Identity
	ns     Netns
	cookie loader.NetnsCookie

	outbound []*net.TCPListener // 127.0.0.1:15001, [::1]:15001
	inbound  *net.TCPListener   // [::]:15006
	hboneLn  *net.TCPListener   // [::]:15008
	hbone    *hbone.Server

	stopOnce sync.Once
	serving  sync.WaitGroup // accept loops
	removed  atomic.Bool    // the workload left: its connections are being reset

	transparent atomic.Bool // source preservation set up in the namespace (transparent.go)
}

func (pd *pod) workload() *config.Workload     { return pd.w.Load() }
func (pd *pod) setWorkload(w *config.Workload) { pd.w.Store(w) }

// startPod fetches the workload's certificate, opens its listeners inside its
// network namespace, and enrolls the namespace for capture, in that order: by
// the time a connect is captured, a listener and a certificate wait for it.
func (p *Proxy) startPod(ctx context.Context, w *config.Workload) (_ *pod, err error) {
	id, err := identity.Parse(w.Identity())
	if err != nil {
		return nil, fmt.Errorf("identity of %s: %w", w, err)
	}
	if w.NetnsPath() == "" {
		return nil, fmt.Errorf("workload %s on this node has no network namespace path", w)
	}
	ns, err := p.deps.Namespaces.Open(w.NetnsPath())
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", w.NetnsPath(), err)
	}
	pd := &pod{proxy: p, id: id, ns: ns}
	pd.setWorkload(w)
	defer func() {
		if err != nil {
			pd.closeListeners()
			p.teardownTransparent(pd)
			ns.Close()
		}
	}()

	// Acquire counts the pod even when it fails: release on every error path.
	defer func() {
		if err != nil {
			p.deps.Certs.Release(id)
		}
	}()
	actx, cancel := context.WithTimeout(ctx, p.deps.CertTimeout)
	err = p.deps.Certs.Acquire(actx, id)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("certificate for %s: %w", id, err)
	}

	listen, err := p.listenFunc(ns, w)
	if err != nil {
		return nil, err
	}
	for i, ip := range []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()} {
		addr := netip.AddrPortFrom(ip, loader.DefaultOutboundPort)
		ln, err := listen(outboundNames[i], addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s in %s: %w", addr, w.NetnsPath(), err)
		}
		pd.outbound = append(pd.outbound, ln)
	}
	if pd.inbound, err = listen("inbound", netip.AddrPortFrom(netip.IPv6Unspecified(), loader.DefaultInboundPort)); err != nil {
		return nil, fmt.Errorf("listen :%d in %s: %w", loader.DefaultInboundPort, w.NetnsPath(), err)
	}
	if pd.hboneLn, err = listen("hbone", netip.AddrPortFrom(netip.IPv6Unspecified(), p.deps.HBONEPort)); err != nil {
		return nil, fmt.Errorf("listen :%d in %s: %w", p.deps.HBONEPort, w.NetnsPath(), err)
	}
	tlsConf, err := p.deps.Certs.ServerConfig(identity.StaticServerIdentity(id.SPIFFEID()))
	if err != nil {
		return nil, fmt.Errorf("server TLS for %s: %w", id, err)
	}
	pd.hbone, err = hbone.NewServer(hbone.ServerConfig{
		TLS:     tlsConf,
		Handler: hbone.HandlerFunc(pd.serveHBONE),
		Params:  p.deps.HBONEParams,
		Logger:  p.log.With("workload", w.String()),
	})
	if err != nil {
		return nil, fmt.Errorf("HBONE server for %s: %w", w, err)
	}
	p.setupTransparent(pd)
	pd.cookie, err = p.deps.Capture.Enroll(w.NetnsPath(), loader.EnrollOptions{
		OutboundPort:  loader.DefaultOutboundPort,
		Inbound:       pd.inbound,
		ExemptSources: p.deps.ExemptSources,
		PodIPs:        w.WorkloadIPs,
	})
	if err != nil {
		return nil, fmt.Errorf("enroll %s: %w", w, err)
	}
	return pd, nil
}

// listenFunc returns how the pod's listeners are opened. With a listener
// store, a socket the holder keeps for this namespace is taken back (the one
// a previous or concurrent agent accepts on), and a new one is handed to
// the holder. Without, every agent opens its own SO_REUSEPORT listener and
// tcp_migrate_req moves connects queued on a closing one to its siblings.
func (p *Proxy) listenFunc(ns Netns, w *config.Workload) (func(name string, addr netip.AddrPort) (*net.TCPListener, error), error) {
	store := p.deps.Listeners
	cn, ok := ns.(cookieNetns)
	if store == nil || !ok {
		if err := ns.EnableRequestMigration(); err != nil {
			p.log.Warn("enable tcp_migrate_req (restarts may reset queued connects)", "workload", w.String(), "err", err)
		}
		return func(_ string, addr netip.AddrPort) (*net.TCPListener, error) { return ns.Listen(addr) }, nil
	}
	cookie, err := cn.Cookie()
	if err != nil {
		return nil, fmt.Errorf("netns cookie of %s: %w", w.NetnsPath(), err)
	}
	// Kept as a fallback: a listener the holder could not take is a
	// SO_REUSEPORT sibling again.
	if err := ns.EnableRequestMigration(); err != nil {
		p.log.Debug("enable tcp_migrate_req", "workload", w.String(), "err", err)
	}
	return func(name string, addr netip.AddrPort) (*net.TCPListener, error) {
		ln, err := store.Take(cookie, name)
		switch {
		case err != nil:
			p.log.Warn("take held listener (opening a new one)", "workload", w.String(), "listener", name, "err", err)
		case ln != nil:
			if got := ln.Addr().(*net.TCPAddr).AddrPort(); got.Port() == addr.Port() {
				p.log.Debug("listening on the held socket", "workload", w.String(), "listener", name, "addr", got.String())
				return ln, nil
			}
			ln.Close()
			p.log.Warn("held listener has the wrong port; opening a new one", "workload", w.String(), "listener", name)
		}
		if ln, err = ns.Listen(addr); err != nil {
			return nil, err
		}
		if err := store.Keep(cookie, name, ln); err != nil {
			p.log.Warn("hand listener to the fd holder (a crash of this agent would refuse connects)", "workload", w.String(), "listener", name, "err", err)
		}
		return ln, nil
	}, nil
}

// serveAll starts the accept loops and the HBONE server.
func (pd *pod) serveAll() {
	p := pd.proxy
	for _, ln := range pd.outbound {
		pd.serve(ln, p.handleOutbound)
	}
	pd.serve(pd.inbound, p.handlePlaintext)
	pd.serving.Add(1)
	go func() {
		defer pd.serving.Done()
		if err := pd.hbone.Serve(pd.hboneLn); err != nil && !errors.Is(err, net.ErrClosed) {
			p.log.Debug("HBONE server ended", "workload", pd.workload().String(), "err", err)
		}
	}()
}

// serve accepts on ln until it closes, handing each connection to handle.
func (pd *pod) serve(ln *net.TCPListener, handle func(*pod, *net.TCPConn)) {
	pd.serving.Add(1)
	go func() {
		defer pd.serving.Done()
		var backoff time.Duration
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				// EMFILE and the like pass: back off and keep the listener serving.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				pd.proxy.log.Warn("accept (retrying)", "addr", ln.Addr().String(), "err", err, "retry_in", backoff.String())
				time.Sleep(backoff)
				continue
			}
			backoff = 0
			if !pd.proxy.track() {
				reset(c)
				return
			}
			go func() {
				defer pd.proxy.wg.Done()
				handle(pd, c)
			}()
		}
	}()
}

// track counts a connection handler in, unless the proxy is shutting down.
func (p *Proxy) track() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.wg.Add(1)
	return true
}

// stop closes the listeners (no new connections); with unenroll it also
// removes capture and releases the certificate, as for a workload that left.
// Open connections are left to drain.
func (pd *pod) stop(unenroll bool) {
	pd.stopOnce.Do(func() {
		if unenroll {
			if err := pd.proxy.deps.Capture.Unenroll(pd.cookie); err != nil {
				pd.proxy.log.Error("unenroll", "workload", pd.workload().String(), "err", err)
			}
			if st := pd.proxy.deps.Listeners; st != nil {
				if err := st.Forget(uint64(pd.cookie)); err != nil {
					pd.proxy.log.Warn("drop held listeners", "workload", pd.workload().String(), "err", err)
				}
			}
		}
		pd.closeListeners()
		if pd.hbone != nil {
			// Tell HBONE clients to open new streams elsewhere; streams in flight go on.
			pd.hbone.GoAway()
		}
		pd.serving.Wait()
		if unenroll {
			pd.closeHBONE()
			pd.proxy.teardownTransparent(pd)
			pd.proxy.deps.Certs.Release(pd.id)
			pd.ns.Close()
		}
	})
}

func (pd *pod) closeListeners() {
	for _, ln := range append(append([]*net.TCPListener(nil), pd.outbound...), pd.inbound, pd.hboneLn) {
		if ln != nil {
			ln.Close()
		}
	}
}

func (pd *pod) closeHBONE() {
	if pd.hbone != nil {
		pd.hbone.Close()
	}
}

// srcAddr returns the pod's address of dst's family, for tunnels to dst.
func (pd *pod) srcAddr(dst netip.Addr) netip.Addr {
	for _, ip := range pd.workload().WorkloadIPs {
		if ip.Is4() == dst.Is4() {
			return ip
		}
	}
	return netip.Addr{}
}

// outboundNames name the 127.0.0.1 and ::1 outbound listeners.
var outboundNames = [2]string{"outbound4", "outbound6"}

// namedListeners are the pod's listeners under the names the listener
// store keeps them by.
func (pd *pod) namedListeners() map[string]*net.TCPListener {
	m := map[string]*net.TCPListener{"inbound": pd.inbound, "hbone": pd.hboneLn}
	for i, ln := range pd.outbound {
		m[outboundNames[i]] = ln
	}
	return m
}
