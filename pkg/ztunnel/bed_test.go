package ztunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/internal/testpki"
	"github.com/warren-mesh/warren/pkg/balance"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/store"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/loader"
)

// A bed is a proxy on one node ("node-a") with fake dependencies and two
// local workloads, on loopback addresses of its own (127.a.b.0/24), so beds
// never share an address:
//
//	client  .11  default/client  HBONE, local (netns /fake/client)
//	server  .12  default/server  HBONE, local (netns /fake/server), endpoint of echo:80 -> 8080
//	legacy  .13  legacy/legacy   TCP (outside the mesh), node-b
//	remote  .30  prod/remote     HBONE, node-b: its agent is b.remote, a pool of its own
//	outside .50                  no workload (plaintext clients)
//	echo.default.svc.cluster.local  VIP 198.18.200.1:80
//
// Tunnels between local pods go through the proxy's own DialTunnel and
// HBONE listeners, as on a real node.
type bed struct {
	t       *testing.T
	prefix  [3]byte
	ca      *testpki.CA
	net     *fakeNet
	capture *fakeCapture
	certs   *fakeCerts
	pool    *hbone.Pool // the proxy's tunnels (unless opts.tunnels)
	remote  *hbone.Pool // the agent of node-b, dialing as remote
	bal     *fakeBalancer
	store   *store.Store
	reg     *prometheus.Registry
	logs    *logSink
	p       *Proxy

	cancelRun context.CancelFunc
	runErr    chan error
	// note is for a test's own signal between its goroutines.
	note chan struct{}
}

// bedOpts change a bed.
type bedOpts struct {
	// noRun leaves Run unstarted: the test applies changes itself.
	noRun bool
	// tunnels replaces the proxy's HBONE pool.
	tunnels Tunnels
	// capture wraps the fake capture (to add Enrolled or HBONEPort).
	capture func(*fakeCapture) Capture
	// config changes the first configuration published (nil: the base one).
	config func(*config.Config)
	// sameNode turns the same-node fast path on.
	sameNode bool
}

var bedSeq atomic.Int32

const (
	trustDomain = "cluster.local"
	clientID    = "spiffe://cluster.local/ns/default/sa/client"
	serverID    = "spiffe://cluster.local/ns/default/sa/server"
	remoteID    = "spiffe://cluster.local/ns/prod/sa/remote"
	impostorID  = "spiffe://cluster.local/ns/default/sa/impostor"
	svcHost     = "echo.default.svc.cluster.local"
	vip         = "198.18.200.1:80"
)

func newBed(t *testing.T, o bedOpts) *bed {
	t.Helper()
	n := bedSeq.Add(1)
	b := &bed{
		t:       t,
		prefix:  [3]byte{127, byte(100 + n/250), byte(n % 250)},
		ca:      testpki.NewCA(t, trustDomain),
		net:     newFakeNet(),
		capture: newFakeCapture(),
		bal:     &fakeBalancer{pick: balance.New(firstRand{})},
		store:   store.New("node-a"),
		reg:     prometheus.NewRegistry(),
		logs:    newLogSink(),
		note:    make(chan struct{}),
	}
	ids := []spiffeid.ID{}
	for _, s := range []string{clientID, serverID, remoteID, impostorID} {
		ids = append(ids, spiffeid.RequireFromString(s))
	}
	b.certs = newFakeCerts(t, b.ca, ids...)
	b.net.ips["/fake/client"] = b.ip(11)
	b.net.ips["/fake/server"] = b.ip(12)

	var capture Capture = b.capture
	if o.capture != nil {
		capture = o.capture(b.capture)
	}
	quiet := slog.New(slog.DiscardHandler)
	tunnels := o.tunnels
	if tunnels == nil {
		pool, err := hbone.NewPool(hbone.PoolConfig{
			TLS:    b.certs.clientTLS(),
			Logger: quiet,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return b.p.DialTunnel(ctx, network, addr)
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		b.pool, tunnels = pool, pool
		t.Cleanup(func() { pool.Close() })
	}
	remote, err := hbone.NewPool(hbone.PoolConfig{TLS: b.certs.clientTLS(), Logger: quiet, DialContext: b.dialAsRemote})
	if err != nil {
		t.Fatal(err)
	}
	b.remote = remote
	t.Cleanup(func() { remote.Close() })

	b.p, err = New(Deps{
		Store:      b.store,
		Capture:    capture,
		Certs:      b.certs,
		Tunnels:    tunnels,
		Balancer:   b.bal,
		Metrics:    NewMetrics(b.reg),
		Namespaces: b.net,
		Log:        quiet,
		AccessLog:  slog.New(b.logs),

		SameNodeFastPath: o.sameNode,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b.p.Shutdown(ctx)
	})
	if o.noRun {
		return b
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.cancelRun, b.runErr = cancel, make(chan error, 1)
	go func() { b.runErr <- b.p.Run(ctx) }()
	t.Cleanup(b.stopRun)
	b.publish(o.config)
	b.waitReady()
	return b
}

// stopRun ends Run and checks that it returned nil.
func (b *bed) stopRun() {
	if b.cancelRun == nil {
		return
	}
	b.cancelRun()
	b.cancelRun = nil
	select {
	case err := <-b.runErr:
		if err != nil {
			b.t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		b.t.Error("Run did not return after its context ended")
	}
}

// ip returns the bed's address 127.a.b.last.
func (b *bed) ip(last byte) netip.Addr {
	return netip.AddrFrom4([4]byte{b.prefix[0], b.prefix[1], b.prefix[2], last})
}

func (b *bed) ap(last byte, port uint16) netip.AddrPort { return netip.AddrPortFrom(b.ip(last), port) }

// baseConfig is the topology in bed's comment.
func (b *bed) baseConfig() config.Config {
	svc := config.NamespacedHostname{Namespace: "default", Hostname: svcHost}
	return config.Config{
		Workloads: []*config.Workload{
			withMeta(&config.Workload{UID: "client", Name: "client-5c8f", Namespace: "default", ServiceAccount: "client",
				WorkloadIPs: []netip.Addr{b.ip(11)}, Protocol: config.ProtocolHBONE, Node: "node-a", Paths: &config.LocalPaths{NetnsPath: "/fake/client"}},
				config.WorkloadMeta{WorkloadName: "client"}, config.Locality{}),
			withMeta(&config.Workload{UID: "server", Name: "server-7d9f", Namespace: "default", ServiceAccount: "server",
				WorkloadIPs: []netip.Addr{b.ip(12)}, Protocol: config.ProtocolHBONE, Node: "node-a", Paths: &config.LocalPaths{NetnsPath: "/fake/server"},
				Capacity: 1, Services: map[config.NamespacedHostname]config.PortMap{svc: {80: 8080}}},
				config.WorkloadMeta{WorkloadName: "server"}, config.Locality{}),
			{UID: "legacy", Name: "legacy", Namespace: "legacy", ServiceAccount: "legacy",
				WorkloadIPs: []netip.Addr{b.ip(13)}, Protocol: config.ProtocolTCP, Node: "node-b"},
			{UID: "remote", Name: "remote", Namespace: "prod", ServiceAccount: "remote",
				WorkloadIPs: []netip.Addr{b.ip(30)}, Protocol: config.ProtocolHBONE, Node: "node-b"},
		},
		Services: []*config.Service{{Name: "echo", Namespace: "default", Hostname: svcHost,
			VIPs: []config.NetworkAddress{{Addr: netip.MustParseAddrPort(vip).Addr()}}, Ports: config.PortMap{80: 8080}}},
	}
}

// snapshot builds a validated snapshot of the base configuration changed by mutate.
func (b *bed) snapshot(mutate func(*config.Config)) *config.Snapshot {
	b.t.Helper()
	c := b.baseConfig()
	if mutate != nil {
		mutate(&c)
	}
	snap, err := config.NewSnapshot(c, config.Options{Node: "node-a", CheckNetns: func(string) error { return nil }})
	if err != nil {
		b.t.Fatal(err)
	}
	return snap
}

// publish makes the base configuration changed by mutate current.
func (b *bed) publish(mutate func(*config.Config)) *config.Snapshot {
	b.t.Helper()
	snap := b.snapshot(mutate)
	b.store.Publish(snap)
	return snap
}

func (b *bed) waitReady() {
	b.t.Helper()
	var err error
	waitFor(b.t, "the proxy serves every local workload", func() bool { err = b.p.Ready(); return err == nil })
}

// waitFor polls cond (no fixed sleep: it returns as soon as cond holds).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// without removes the workload uid from a configuration.
func without(uid string) func(*config.Config) {
	return func(c *config.Config) {
		c.Workloads = slices.DeleteFunc(c.Workloads, func(w *config.Workload) bool { return w.UID == uid })
	}
}

// workload returns the workload uid of c, to change it.
func workload(c *config.Config, uid string) *config.Workload {
	for _, w := range c.Workloads {
		if w.UID == uid {
			return w
		}
	}
	panic("no workload " + uid)
}

// withPolicy adds a Namespace-scoped policy with one match.
func withPolicy(name string, action config.Action, m config.Match) func(*config.Config) {
	return func(c *config.Config) {
		c.Policies = append(c.Policies, &config.AuthorizationPolicy{Name: name, Namespace: "default", Scope: config.ScopeNamespace,
			Action: action, Rules: []config.Rule{{{m}}}})
	}
}

// both applies several changes in order.
func both(fs ...func(*config.Config)) func(*config.Config) {
	return func(c *config.Config) {
		for _, f := range fs {
			if f != nil {
				f(c)
			}
		}
	}
}

// listener returns where the pod's listener for addr really listens.
func (b *bed) listener(path string, addr netip.AddrPort) netip.AddrPort {
	b.t.Helper()
	ns := b.net.current(path)
	if ns == nil {
		b.t.Fatalf("namespace %s never opened", path)
	}
	return ns.listener(b.t, addr)
}

var (
	outbound4 = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), loader.DefaultOutboundPort)
	plainAny  = netip.AddrPortFrom(netip.IPv6Unspecified(), loader.DefaultInboundPort)
)

// dialOutbound connects as an app of the pod at path whose connect to orig
// was captured, as cgroup/connect4 would send it to 15001.
func (b *bed) dialOutbound(path string, orig netip.AddrPort) *net.TCPConn {
	b.t.Helper()
	c, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(b.listener(path, outbound4)))
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { c.Close() })
	b.capture.setOrig(c.LocalAddr().(*net.TCPAddr).AddrPort(), orig, nil)
	return c
}

// dialPlaintext connects from from to the server pod's address and port
// 15006's listener: what sk_lookup steers a connect from outside the mesh
// to. The listener's port stands for the app port the client asked for.
func (b *bed) dialPlaintext(from netip.Addr) *net.TCPConn {
	b.t.Helper()
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
	c, err := d.Dial("tcp4", b.plainDst().String())
	if errors.Is(err, syscall.ECONNRESET) {
		// The handler refused the connection before the dialer saw it
		// established: refused accepts a nil connection.
		return nil
	}
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// plainDst is the original destination of plaintext connects in the bed.
func (b *bed) plainDst() netip.AddrPort { return b.listener("/fake/server", plainAny) }

// dialAsRemote is the remote agent's dialer: from the Request's source IP,
// to where the fake network routes the HBONE address.
func (b *bed) dialAsRemote(ctx context.Context, _, addr string) (net.Conn, error) {
	dst := netip.MustParseAddrPort(addr)
	b.net.mu.Lock()
	h, ok := b.net.routes[dst]
	b.net.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no route to %s", dst)
	}
	d := net.Dialer{}
	if r, ok := hbone.DialRequest(ctx); ok && r.SourceIP.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(r.SourceIP, 0))
	}
	return d.DialContext(ctx, "tcp4", h.real.String())
}

// tunnelFromRemote opens a tunnel from the remote workload (node-b) to
// authority through the server pod's HBONE listener.
func (b *bed) tunnelFromRemote(authority netip.AddrPort, hdr map[string]string) (*hbone.Stream, error) {
	return b.tunnelFrom(b.ip(30), authority, hdr)
}

// tunnelFrom opens a tunnel as remote from the address src.
func (b *bed) tunnelFrom(src netip.Addr, authority netip.AddrPort, hdr map[string]string) (*hbone.Stream, error) {
	req := hbone.Request{
		Source:    spiffeid.RequireFromString(remoteID),
		Expected:  []spiffeid.ID{spiffeid.RequireFromString(serverID)},
		Addr:      b.ap(12, b.p.deps.HBONEPort),
		SourceIP:  src,
		Authority: authority,
	}
	for k, v := range hdr {
		if req.Headers == nil {
			req.Headers = map[string][]string{}
		}
		req.Headers[k] = []string{v}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.remote.Dial(ctx, req)
	if err == nil {
		b.t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// app is a TCP server standing for an application, reached at a virtual address.
type app struct {
	ln    *net.TCPListener
	conns chan *net.TCPConn // each accepted connection, when hold is set
	hold  bool
}

// echoApp serves at virt: it echoes until EOF, then closes. With hold, it
// hands each connection to the test instead.
func (b *bed) echoApp(virt netip.AddrPort, hold bool) *app {
	b.t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.t.Fatal(err)
	}
	a := &app{ln: ln, conns: make(chan *net.TCPConn, 16), hold: hold}
	b.t.Cleanup(func() { ln.Close() })
	b.net.route(virt, ln.Addr().(*net.TCPAddr).AddrPort())
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			if a.hold {
				a.conns <- c
				continue
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.CloseWrite()
			}()
		}
	}()
	return a
}

// halfCloser is a connection with a write side to close (TCP, HBONE stream).
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// exchange sends msg, half-closes, and checks the echo and the EOF after it.
func exchange(t testing.TB, c halfCloser, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != msg {
		t.Fatalf("echo: got %q, %v; want %q and EOF", got, err, msg)
	}
	c.Close()
}

// echoOnce writes msg and reads its echo, leaving the connection open.
func echoOnce(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: got %q, %v; want %q", buf, err, msg)
	}
	c.SetDeadline(time.Time{})
}

// refused checks that the proxy ended c without sending a byte; a nil c
// was reset while connecting.
func refused(t testing.TB, c *net.TCPConn) {
	t.Helper()
	if c == nil {
		return
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || err == nil || isTimeout(err) {
		t.Fatalf("read from a refused connection: %d bytes, %v; want it ended", n, err)
	}
}

// wasReset checks that c ended in error (a reset), not with EOF.
func wasReset(t testing.TB, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if err == nil || isTimeout(err) {
		t.Fatalf("connection ended with %v, want a reset", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// logSink is the access log: each record as its attributes.
type logSink struct {
	ch chan map[string]string
}

func newLogSink() *logSink { return &logSink{ch: make(chan map[string]string, 256)} }

func (s *logSink) Enabled(context.Context, slog.Level) bool { return true }
func (s *logSink) WithAttrs([]slog.Attr) slog.Handler       { return s }
func (s *logSink) WithGroup(string) slog.Handler            { return s }
func (s *logSink) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message}
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	s.ch <- m
	return nil
}

// next returns the next access-log record.
func (s *logSink) next(t testing.TB) map[string]string {
	t.Helper()
	select {
	case m := <-s.ch:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no access-log record")
		return nil
	}
}

// nextWhere returns the next record with direction dir, skipping others.
func (s *logSink) nextWhere(t testing.TB, dir string) map[string]string {
	t.Helper()
	for {
		if m := s.next(t); m["direction"] == dir {
			return m
		}
	}
}

// none checks that no record is pending.
func (s *logSink) none(t testing.TB) {
	t.Helper()
	select {
	case m := <-s.ch:
		t.Errorf("unexpected access-log record %v", m)
	default:
	}
}

// Special values of checkLog's want.
const (
	absent  = "\x00absent"  // the field must not be there
	present = "\x00present" // the field must be there, with any value
)

// checkLog compares the fields of want with a record. A want ending in
// "..." is a prefix; "...x" in the middle of a want matches any text there.
func checkLog(t testing.TB, got map[string]string, want map[string]string) {
	t.Helper()
	bad := false
	for k, w := range want {
		g, ok := got[k]
		switch {
		case w == absent:
			if ok {
				t.Errorf("access log %s = %q, want none", k, g)
				bad = true
			}
		case w == present:
			if !ok {
				t.Errorf("access log has no %s", k)
				bad = true
			}
		case !ok:
			t.Errorf("access log has no %s, want %q", k, w)
			bad = true
		case strings.Contains(w, "..."):
			if !matchDots(g, w) {
				t.Errorf("access log %s = %q, want %q", k, g, w)
				bad = true
			}
		case g != w:
			t.Errorf("access log %s = %q, want %q", k, g, w)
			bad = true
		}
	}
	if bad {
		t.Logf("record: %v", got)
	}
}

// matchDots matches s against a pattern whose "..." stand for any text.
func matchDots(s, pattern string) bool {
	parts := strings.Split(pattern, "...")
	if !strings.HasPrefix(s, parts[0]) {
		return false
	}
	s = s[len(parts[0]):]
	for i, p := range parts[1:] {
		if i == len(parts)-2 {
			return strings.HasSuffix(s, p)
		}
		j := strings.Index(s, p)
		if j < 0 {
			return false
		}
		s = s[j+len(p):]
	}
	return true
}

// Metric label sets. lbl renders the full label set of a series: every
// label ztunnel's TCP metrics carry, "unknown" unless given, protocol tcp
// and response_flags "-".
func lbl(reporter string, kv ...string) string {
	m := map[string]string{"reporter": reporter, "request_protocol": "tcp", "response_flags": "-"}
	for _, l := range connLabels {
		if _, ok := m[l]; !ok {
			m[l] = "unknown"
		}
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if _, ok := m[kv[i]]; !ok {
			panic("unknown label " + kv[i])
		}
		m[kv[i]] = kv[i+1]
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var sb strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&sb, "%s=%s,", k, m[k])
	}
	return sb.String()
}

// Label pairs of the bed's workloads, as source and as destination.
var (
	srcClient = []string{"source_workload", "client", "source_workload_namespace", "default", "source_principal", clientID}
	dstServer = []string{"destination_workload", "server", "destination_workload_namespace", "default", "destination_principal", serverID}
	srcRemote = []string{"source_workload", "remote", "source_workload_namespace", "prod", "source_principal", remoteID}
	dstLegacy = []string{"destination_workload", "legacy", "destination_workload_namespace", "legacy", "destination_principal", "spiffe://cluster.local/ns/legacy/sa/legacy"}
	viaSvc    = []string{"destination_service", svcHost, "destination_service_name", "echo", "destination_service_namespace", "default"}
	mtls      = []string{"connection_security_policy", "mutual_tls"}
	plain     = []string{"connection_security_policy", "unknown"}
)

// l joins label pairs.
func l(parts ...[]string) []string { return slices.Concat(parts...) }

// flags is the response_flags pair.
func flags(f string) []string { return []string{"response_flags", f} }

// families returns each istio_tcp_* family as label set -> value.
func (b *bed) families() map[string]map[string]float64 {
	b.t.Helper()
	mfs, err := b.reg.Gather()
	if err != nil {
		b.t.Fatal(err)
	}
	out := map[string]map[string]float64{}
	for _, mf := range mfs {
		fam := map[string]float64{}
		for _, m := range mf.GetMetric() {
			kv := []string{}
			reporter := ""
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "reporter" {
					reporter = lp.GetValue()
					continue
				}
				kv = append(kv, lp.GetName(), lp.GetValue())
			}
			fam[lbl(reporter, kv...)] = m.GetCounter().GetValue()
		}
		out[strings.TrimPrefix(mf.GetName(), "istio_tcp_")] = fam
	}
	return out
}

// series is the expected value of each series of one family.
type series map[string]float64

// checkMetrics compares every istio_tcp_* family with want: a family or a
// series not in want must not exist (a zero series may).
func (b *bed) checkMetrics(want map[string]series) {
	b.t.Helper()
	got := b.families()
	for _, fam := range []string{"connections_opened_total", "connections_closed_total", "connections_failed_total", "received_bytes_total", "sent_bytes_total"} {
		g, w := got[fam], want[fam]
		for k, v := range w {
			if g[k] != v {
				b.t.Errorf("%s{%s} = %v, want %v", fam, k, g[k], v)
			}
		}
		for k, v := range g {
			if _, ok := w[k]; !ok && v != 0 {
				b.t.Errorf("unexpected series %s{%s} = %v", fam, k, v)
			}
		}
	}
}

// failedOnly is the metrics of connections that never got through: opened,
// closed and failed, each once per series given, and no bytes.
func failedOnly(sets ...string) map[string]series {
	s := series{}
	for _, k := range sets {
		s[k]++
	}
	return map[string]series{"connections_opened_total": s, "connections_closed_total": s, "connections_failed_total": s}
}

// through is the metrics of connections that got through and closed with
// flags "-": opened and closed once each, with bytes.
func through(set string, n, received, sent float64) map[string]series {
	return map[string]series{
		"connections_opened_total": {set: n},
		"connections_closed_total": {set: n},
		"received_bytes_total":     {set: received},
		"sent_bytes_total":         {set: sent},
	}
}

// merge adds metric expectations together.
func merge(ms ...map[string]series) map[string]series {
	out := map[string]series{}
	for _, m := range ms {
		for fam, s := range m {
			if out[fam] == nil {
				out[fam] = series{}
			}
			for k, v := range s {
				out[fam][k] += v
			}
		}
	}
	return out
}

// cookie returns the capture cookie of the pod at path.
func (b *bed) cookie(path string) loader.NetnsCookie {
	b.t.Helper()
	c, ok := b.capture.cookieOf(path)
	if !ok {
		b.t.Fatalf("%s is not enrolled", path)
	}
	return c
}

// podOf returns the proxy's pod for uid.
func (b *bed) podOf(uid string) *pod {
	b.p.mu.Lock()
	defer b.p.mu.Unlock()
	return b.p.pods[uid]
}

// openConns counts the proxy's tracked connections.
func (b *bed) openConns() int {
	return len(b.p.openConns(func(*tracked) bool { return true }))
}

// withMeta sets w's WorkloadMeta and Locality (not fields: see config.Workload) and returns w.
func withMeta(w *config.Workload, m config.WorkloadMeta, l config.Locality) *config.Workload {
	w.SetMeta(m)
	w.SetLocality(l)
	return w
}
