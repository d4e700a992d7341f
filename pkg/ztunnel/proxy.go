package ztunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/pkg/balance"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/store"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/loader"
)

// Capture is what the proxy needs of the BPF loader.
type Capture interface {
	Enroll(netnsPath string, opts loader.EnrollOptions) (loader.NetnsCookie, error)
	Unenroll(loader.NetnsCookie) error
	OriginalDst(*net.TCPConn) (netip.AddrPort, error)
}

// Certificates is what the proxy needs of the identity manager.
type Certificates interface {
	Acquire(ctx context.Context, id identity.Identity) error
	Release(id identity.Identity)
	ServerConfig(choose identity.ServerIdentityFunc) (*tls.Config, error)
}

// Namespaces opens the network namespaces of local workloads; HostNamespaces
// is the real one.
type Namespaces interface {
	Open(path string) (Netns, error)
}

// Netns is one workload's network namespace: the proxy listens and dials
// inside it, with the agent's mark (loader.Mark) on every socket.
type Netns interface {
	// Listen opens a TCP listener on addr (SO_REUSEPORT, no MPTCP).
	Listen(addr netip.AddrPort) (*net.TCPListener, error)
	// Dial connects to dst, from src when src is valid.
	Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error)
	// EnableRequestMigration lets connections queued on a closing listener
	// move to another listener of the same port (net.ipv4.tcp_migrate_req),
	// so a restarting agent hands over its queue instead of resetting it.
	EnableRequestMigration() error
	// Close releases the namespace; Dial fails afterwards. Listeners and
	// connections already open are unaffected.
	Close() error
}

// ListenerStore keeps a copy of each pod's listening sockets in a process
// that outlives the agent (package fdstore's holder). While no agent runs,
// the kernel still completes connects into those sockets' accept queues;
// the next agent takes the same sockets back and accepts them, and two
// agents running side by side accept on the very same sockets.
type ListenerStore interface {
	// Take returns the listener held under name for the network namespace
	// with cookie, or nil and no error if none is held.
	Take(cookie uint64, name string) (*net.TCPListener, error)
	// Keep hands the holder a copy of ln.
	Keep(cookie uint64, name string, ln *net.TCPListener) error
	// Forget drops every listener held for the namespace.
	Forget(cookie uint64) error
	// Cookies lists the namespaces the holder keeps listeners for.
	Cookies() ([]uint64, error)
}

// cookieNetns is a Netns that can name itself by netns cookie, which keys
// held listeners (hostNetns is one).
type cookieNetns interface {
	Cookie() (uint64, error)
}

// Tunnels opens HBONE streams (a *hbone.Pool).
type Tunnels interface {
	Dial(ctx context.Context, req hbone.Request) (*hbone.Stream, error)
}

// Balancer picks the endpoint of a service VIP connection (a *balance.Picker).
type Balancer interface {
	Pick(src balance.Endpoints, svc *config.Service, vip netip.AddrPort, from *config.Workload) (balance.Choice, error)
}

// Deps is everything the proxy uses, built once by the agent's main.
type Deps struct {
	Store    *store.Store
	Capture  Capture
	Certs    Certificates
	Tunnels  Tunnels
	Balancer Balancer
	Metrics  *Metrics // nil records nothing
	// Namespaces opens workloads' network namespaces; nil means
	// HostNamespaces{}.
	Namespaces Namespaces
	// HBONEPort is the port of the HBONE listeners, here and on every other
	// node. Zero means the capture's (whose sk_lookup must never steer it),
	// which New reads from Capture when it has an HBONEPort method (a
	// *loader.Loader does), else loader.DefaultHBONEPort. New refuses a
	// port that differs from the capture's.
	HBONEPort uint16
	Log       *slog.Logger
	// AccessLog gets one record per closed connection; nil disables it.
	AccessLog *slog.Logger
	// ExemptSources are never steered to the plaintext listener (the node's
	// addresses, for kubelet probes).
	ExemptSources []netip.Addr
	// HBONEParams tunes the inbound HBONE servers.
	HBONEParams hbone.Params
	// CertTimeout bounds the certificate fetch before a workload is enrolled.
	CertTimeout time.Duration
	// RetryInterval is how often a workload whose setup failed is tried
	// again (default 5 s).
	RetryInterval time.Duration
	// SameNodeFastPath carries connections between two pods this agent
	// serves without TLS and HTTP/2: the agent authorizes them as the
	// destination would a tunnel from the source's identity and relays the
	// two sockets with splice(2) (samenode.go). False sends them over HBONE
	// like any other mesh connection. The agent's --same-node-fast-path
	// flag sets it, on by default.
	SameNodeFastPath bool
	// Listeners, when set, holds copies of the pods' listening sockets so
	// that they outlive this process (see ListenerStore); nil opens fresh
	// SO_REUSEPORT listeners and relies on tcp_migrate_req at restarts.
	Listeners ListenerStore
}

// Proxy runs the listeners of every local workload and keeps them in step
// with the configuration store.
type Proxy struct {
	deps Deps
	log  *slog.Logger

	mu    sync.Mutex
	pods  map[string]*pod       // by workload UID
	byIP  map[netip.Addr]*pod   // local pod addresses, for the tunnel dialer
	conns map[*tracked]struct{} // open connections: drained, reset on removal, re-checked on policy changes
	ready map[string]error      // last setup error per workload UID (nil: serving)

	closing   bool
	accepting bool           // false once StopAccepting ran
	wg        sync.WaitGroup // connection handlers
	// drain is Shutdown's context: once it is done, open connections are
	// being reset.
	drain atomic.Pointer[context.Context]
}

// drainExpired reports whether Shutdown's deadline has passed.
func (p *Proxy) drainExpired() bool {
	ctx := p.drain.Load()
	return ctx != nil && (*ctx).Err() != nil
}

// New checks deps and returns a proxy that serves nothing until Run.
func New(deps Deps) (*Proxy, error) {
	if deps.Store == nil || deps.Capture == nil || deps.Certs == nil || deps.Tunnels == nil || deps.Balancer == nil {
		return nil, errors.New("ztunnel: Store, Capture, Certs, Tunnels and Balancer are required")
	}
	if c, ok := deps.Capture.(interface{ HBONEPort() uint16 }); ok {
		if port := c.HBONEPort(); deps.HBONEPort != 0 && deps.HBONEPort != port {
			return nil, fmt.Errorf("ztunnel: HBONE port %d differs from the capture's %d, whose sk_lookup would steer it", deps.HBONEPort, port)
		} else if deps.HBONEPort == 0 {
			deps.HBONEPort = port
		}
	}
	if deps.HBONEPort == 0 {
		deps.HBONEPort = loader.DefaultHBONEPort
	}
	if deps.Namespaces == nil {
		deps.Namespaces = HostNamespaces{}
	}
	if deps.Log == nil {
		deps.Log = slog.Default()
	}
	if deps.CertTimeout == 0 {
		deps.CertTimeout = 30 * time.Second
	}
	if deps.RetryInterval == 0 {
		deps.RetryInterval = 5 * time.Second
	}
	return &Proxy{
		deps:  deps,
		log:   deps.Log,
		pods:  map[string]*pod{},
		byIP:  map[netip.Addr]*pod{},
		conns: map[*tracked]struct{}{},
		ready: map[string]error{},

		accepting: true,
	}, nil
}

// Run follows the store's changes until ctx ends: it starts the listeners and
// capture of added local workloads, stops removed ones, and re-checks open
// connections when policies change.
func (p *Proxy) Run(ctx context.Context) error {
	sub := p.deps.Store.Subscribe()
	defer sub.Close()
	changes := make(chan store.Change)
	errc := make(chan error, 1)
	go func() {
		for {
			ch, err := sub.Next(ctx)
			if err != nil {
				errc <- err
				return
			}
			select {
			case changes <- ch:
			case <-ctx.Done():
				return
			}
		}
	}()
	retry := time.NewTicker(p.deps.RetryInterval)
	defer retry.Stop()
	reconciled := false
	for {
		select {
		case ch := <-changes:
			p.apply(ctx, ch)
			if !reconciled {
				reconciled = true
				if err := p.Reconcile(); err != nil {
					p.log.Error("reconcile capture with the configuration", "err", err)
				}
			}
		case <-retry.C:
			p.retryFailed(ctx)
		case err := <-errc:
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("ztunnel: follow config: %w", err)
		case <-ctx.Done():
			return nil
		}
	}
}

// retryFailed starts again the local workloads whose setup failed (a CA
// that was unreachable, a netns that was not there yet).
func (p *Proxy) retryFailed(ctx context.Context) {
	snap := p.deps.Store.Current()
	for _, w := range snap.EnrolledWorkloads() {
		p.mu.Lock()
		_, serving := p.pods[w.UID]
		err, failed := p.ready[w.UID]
		p.mu.Unlock()
		if !serving && failed && err != nil {
			p.log.Info("retrying workload setup", "workload", w.String(), "last_err", err)
			p.addWorkload(ctx, w)
		}
	}
}

func (p *Proxy) apply(ctx context.Context, ch store.Change) {
	for _, w := range ch.Removed {
		p.removeWorkload(w)
	}
	for _, c := range ch.Changed {
		if c.Reenroll() {
			p.removeWorkload(c.Old)
			p.addWorkload(ctx, c.New)
		} else {
			p.updateWorkload(c.New)
		}
	}
	for _, w := range ch.Added {
		p.addWorkload(ctx, w)
	}
	if ch.PoliciesChanged {
		p.recheck(ch.New)
	}
}

func (p *Proxy) addWorkload(ctx context.Context, w *config.Workload) {
	p.mu.Lock()
	closing := p.closing || !p.accepting
	p.mu.Unlock()
	if closing {
		return // a draining agent starts nothing: its successor will
	}
	pd, err := p.startPod(ctx, w)
	p.mu.Lock()
	p.ready[w.UID] = err
	if err == nil {
		// Registered before the first accept, so tunnels from this pod find it.
		p.pods[w.UID] = pd
		for _, ip := range w.WorkloadIPs {
			p.byIP[ip] = pd
		}
	}
	p.mu.Unlock()
	if err != nil {
		p.log.Error("start workload (retrying)", "workload", w.String(), "err", err)
		return
	}
	pd.serveAll()
	p.log.Info("workload enrolled", "workload", w.String(), "identity", pd.id.String(), "netns", w.NetnsPath())
}

func (p *Proxy) updateWorkload(w *config.Workload) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pd, ok := p.pods[w.UID]; ok {
		pd.setWorkload(w)
	}
}

func (p *Proxy) removeWorkload(w *config.Workload) {
	p.mu.Lock()
	pd, ok := p.pods[w.UID]
	delete(p.pods, w.UID)
	delete(p.ready, w.UID)
	if ok {
		for _, ip := range pd.workload().WorkloadIPs {
			if p.byIP[ip] == pd {
				delete(p.byIP, ip)
			}
		}
	}
	p.mu.Unlock()
	if !ok {
		return
	}
	pd.removed.Store(true)
	pd.stop(true)
	p.closeConnsOf(pd)
	p.log.Info("workload removed", "workload", w.String())
}

// podByIP returns the local pod that owns ip.
func (p *Proxy) podByIP(ip netip.Addr) (*pod, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pd, ok := p.byIP[ip.Unmap()]
	return pd, ok
}

// tunnelConnectTimeout bounds the TCP connect of a tunnel, within the
// pool's handshake timeout and the outbound dial's: a connect that takes
// longer is reported as NETWORK_POLICY, as ztunnel reports it.
const tunnelConnectTimeout = dialTimeout / 2

// errTunnelTimeout marks a tunnel whose TCP connect to the HBONE port timed
// out: ztunnel's MaybeHBONENetworkPolicyError, response flag NETWORK_POLICY.
var errTunnelTimeout = errors.New("connect to the HBONE port timed out (is a network policy blocking it?)")

// DialTunnel is the hbone.PoolConfig DialContext of the agent: it opens the
// tunnel's TCP connection from the source pod's network namespace and
// address, with the agent's mark.
func (p *Proxy) DialTunnel(ctx context.Context, network, addr string) (net.Conn, error) {
	req, ok := hbone.DialRequest(ctx)
	if !ok || !req.SourceIP.IsValid() {
		return nil, fmt.Errorf("dial tunnel to %s: no source pod", addr)
	}
	pd, ok := p.podByIP(req.SourceIP)
	if !ok {
		return nil, fmt.Errorf("dial tunnel to %s: no local pod has %s", addr, req.SourceIP)
	}
	dst, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dial tunnel: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, tunnelConnectTimeout)
	defer cancel()
	c, err := p.dialIn(ctx, pd, req.SourceIP, dst)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, unix.ETIMEDOUT) {
			return nil, fmt.Errorf("from %s: %w: %w", req.SourceIP, errTunnelTimeout, err)
		}
		return nil, fmt.Errorf("from %s: %w", req.SourceIP, err)
	}
	return c, nil
}

// Ready reports nil once the configuration is loaded and every local
// workload serves, or says what is missing.
func (p *Proxy) Ready() error {
	select {
	case <-p.deps.Store.Loaded():
	default:
		return errors.New("configuration not loaded yet")
	}
	snap := p.deps.Store.Current()
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for _, w := range snap.EnrolledWorkloads() {
		if _, ok := p.pods[w.UID]; ok {
			continue
		}
		if err := p.ready[w.UID]; err != nil {
			errs = append(errs, fmt.Errorf("workload %s: %w", w, err))
		} else {
			errs = append(errs, fmt.Errorf("workload %s: starting", w))
		}
	}
	return errors.Join(errs...)
}

// WorkloadStatus is one local workload in the admin view.
type WorkloadStatus struct {
	UID       string   `json:"uid"`
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Identity  string   `json:"identity"`
	IPs       []string `json:"ips"`
	Netns     string   `json:"netns"`
	Cookie    uint64   `json:"netnsCookie,omitempty"`
	Serving   bool     `json:"serving"`
	Error     string   `json:"error,omitempty"`
	Open      int      `json:"openInboundConnections"`
}

// Workloads lists the local workloads and whether each is served.
func (p *Proxy) Workloads() []WorkloadStatus {
	snap := p.deps.Store.Current()
	p.mu.Lock()
	defer p.mu.Unlock()
	open := map[*pod]int{}
	for c := range p.conns {
		if c.authz != nil { // inbound: outbound connections are tracked too, for the drain
			open[c.pod]++
		}
	}
	var out []WorkloadStatus
	for _, w := range snap.EnrolledWorkloads() {
		st := WorkloadStatus{UID: w.UID, Name: w.Name, Namespace: w.Namespace, Identity: w.Identity(), Netns: w.NetnsPath()}
		for _, ip := range w.WorkloadIPs {
			st.IPs = append(st.IPs, ip.String())
		}
		if pd, ok := p.pods[w.UID]; ok {
			st.Serving, st.Cookie, st.Open = true, uint64(pd.cookie), open[pd]
		} else if err := p.ready[w.UID]; err != nil {
			st.Error = err.Error()
		}
		out = append(out, st)
	}
	return out
}

// Shutdown stops accepting on every listener but keeps capture enrolled (a
// new agent takes over the pinned state and the shared ports), then waits for
// open connections to end until ctx is done, and resets the rest. Stop Run
// first, so that nothing starts while the proxy drains.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.drain.Store(&ctx)
	p.mu.Lock()
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	p.mu.Unlock()
	// Listeners first: connects still queued on them move to the new agent's
	// listeners (tcp_migrate_req); what was accepted is served.
	for _, pd := range pods {
		pd.stop(false)
	}
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	// The HBONE servers close their connections only after the open
	// connections have been revoked, so that each is counted and accounted
	// as reset at the deadline.
	hctx, hcancel := context.WithCancel(context.Background())
	defer hcancel()
	done := make(chan struct{})
	go func() {
		var hw sync.WaitGroup
		for _, pd := range pods {
			if pd.hbone != nil {
				hw.Add(1)
				go func() {
					defer hw.Done()
					// Sends GOAWAY, waits for streams to end or hctx, then closes.
					pd.hbone.Shutdown(hctx)
				}()
			}
		}
		p.wg.Wait()
		hw.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	open := p.openConns(func(*tracked) bool { return true })
	for _, c := range open {
		c.revoke(errRevokedDrain, "")
	}
	hcancel()
	<-done
	return fmt.Errorf("ztunnel: drain deadline passed with %d connection(s) open; reset them", len(open))
}

// Reconcile unenrolls the network namespaces that capture holds but no local
// workload of the current configuration has: pods that went away while no
// agent ran. Call it once the first configuration is in force.
func (p *Proxy) Reconcile() error {
	lister, ok := p.deps.Capture.(interface {
		Enrolled() ([]loader.NetnsCookie, error)
	})
	if !ok {
		return nil
	}
	cookies, err := lister.Enrolled()
	if err != nil {
		return fmt.Errorf("list enrolled namespaces: %w", err)
	}
	p.mu.Lock()
	keep := map[loader.NetnsCookie]bool{}
	for _, pd := range p.pods {
		keep[pd.cookie] = true
	}
	p.mu.Unlock()
	for _, c := range cookies {
		if keep[c] {
			continue
		}
		p.log.Info("unenrolling a namespace no workload has (left while no agent ran)", "netns_cookie", uint64(c))
		if err := p.deps.Capture.Unenroll(c); err != nil {
			return fmt.Errorf("unenroll stale netns %d: %w", c, err)
		}
	}
	if p.deps.Listeners == nil {
		return nil
	}
	held, err := p.deps.Listeners.Cookies()
	if err != nil {
		return fmt.Errorf("list held listeners: %w", err)
	}
	for _, c := range held {
		if keep[loader.NetnsCookie(c)] {
			continue
		}
		// Holding them would keep a deleted pod's namespace alive.
		p.log.Info("dropping held listeners of a namespace no workload has", "netns_cookie", c)
		if err := p.deps.Listeners.Forget(c); err != nil {
			return fmt.Errorf("forget held listeners of netns %d: %w", c, err)
		}
	}
	return nil
}

// KeepListeners hands every serving pod's listeners to the listener store
// again, for a holder that restarted empty. It returns how many it kept.
func (p *Proxy) KeepListeners() (int, error) {
	st := p.deps.Listeners
	if st == nil {
		return 0, nil
	}
	p.mu.Lock()
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	accepting := p.accepting
	p.mu.Unlock()
	if !accepting {
		return 0, nil
	}
	n := 0
	var errs []error
	for _, pd := range pods {
		for name, ln := range pd.namedListeners() {
			if ln == nil {
				continue
			}
			if err := st.Keep(uint64(pd.cookie), name, ln); err != nil {
				errs = append(errs, fmt.Errorf("%s %s: %w", pd.workload(), name, err))
				continue
			}
			n++
		}
	}
	return n, errors.Join(errs...)
}

// StopAccepting closes every pod's listeners (held copies and a
// successor's stay open) and makes the proxy start no new workload; open
// connections go on. Shutdown then drains them.
func (p *Proxy) StopAccepting() {
	p.mu.Lock()
	p.accepting = false
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	p.mu.Unlock()
	for _, pd := range pods {
		pd.stop(false)
	}
}
