package spire_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/spire"
)

const (
	spireVersion = "1.13.3"
	trustDomain  = "cluster.local"
	// delegateID is this test's own identity, authorized as a delegate.
	delegateID = "spiffe://" + trustDomain + "/warren/nodeagent"
	// shortTTL is the lifetime of the identity the test watches rotate.
	shortTTL = 20 * time.Second
)

// spireBins returns the directory with spire-server and spire-agent, or
// skips (fails in CI) when they have not been built.
func spireBins(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("WARREN_TOOLS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "warren", "tools")
	}
	dir := filepath.Join(cache, "spire-v"+spireVersion)
	for _, b := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			testenv.SkipOrFail(t, "SPIRE v%s not built (%v): run make tools (hack/build-spire.sh)", spireVersion, err)
		}
	}
	return dir
}

// proc is a SPIRE process this test started; only its PID is ever signalled.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func start(t *testing.T, dir, name string, args ...string) *proc {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { cmd.Wait(); logf.Close(); close(p.done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s log (last 4 KiB):\n%s", name, tail(b, 4096))
		}
	})
	return p
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// waitOK runs args until they succeed or 30 s pass.
func waitOK(t *testing.T, p *proc, args ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err == nil {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited: %s", p.name, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// spireEnv is a SPIRE server and agent on loopback.
type spireEnv struct {
	bin, dir     string
	serverSock   string
	workloadSock string
	adminSock    string
	agentID      string
}

func startSPIRE(t *testing.T) *spireEnv {
	t.Helper()
	bin := spireBins(t)
	// Unix socket paths must stay under 108 bytes: a short directory in /tmp.
	dir, err := os.MkdirTemp("", "wspire")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"server", "agent", "admin", "workload"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	e := &spireEnv{
		bin: bin, dir: dir,
		serverSock:   filepath.Join(dir, "server", "api.sock"),
		workloadSock: filepath.Join(dir, "workload", "api.sock"),
		adminSock:    filepath.Join(dir, "admin", "admin.sock"),
	}
	port := freePort(t)
	serverConf := fmt.Sprintf(`
server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    default_x509_svid_ttl = "1h"
    ca_key_type = "ec-p256"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`, port, e.serverSock, trustDomain, filepath.Join(dir, "server"), filepath.Join(dir, "server", "datastore.sqlite3"))
	writeFile(t, filepath.Join(dir, "server.conf"), serverConf)
	server := start(t, dir, "spire-server", filepath.Join(bin, "spire-server"), "run", "-config", filepath.Join(dir, "server.conf"))
	waitOK(t, server, filepath.Join(bin, "spire-server"), "healthcheck", "-socketPath", e.serverSock)

	out := run(t, filepath.Join(bin, "spire-server"), "token", "generate", "-socketPath", e.serverSock, "-ttl", "600")
	token := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "Token:"))
	if token == "" {
		t.Fatalf("no token in %q", out)
	}
	e.agentID = "spiffe://" + trustDomain + "/spire/agent/join_token/" + token

	agentConf := fmt.Sprintf(`
agent {
    data_dir = %q
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%d"
    socket_path = %q
    admin_socket_path = %q
    trust_domain = %q
    insecure_bootstrap = true
    join_token = %q
    authorized_delegates = [%q]
    experimental {
        sync_interval = "1s"
    }
}
plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`, filepath.Join(dir, "agent"), port, e.workloadSock, e.adminSock, trustDomain, token, delegateID)
	writeFile(t, filepath.Join(dir, "agent.conf"), agentConf)
	agent := start(t, dir, "spire-agent", filepath.Join(bin, "spire-agent"), "run", "-config", filepath.Join(dir, "agent.conf"))
	waitOK(t, agent, filepath.Join(bin, "spire-agent"), "healthcheck", "-socketPath", e.workloadSock)
	return e
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// register creates a registration entry under this node's agent.
func (e *spireEnv) register(t *testing.T, spiffeID string, ttl time.Duration, selectors ...string) {
	t.Helper()
	args := []string{filepath.Join(e.bin, "spire-server"), "entry", "create", "-socketPath", e.serverSock,
		"-parentID", e.agentID, "-spiffeID", spiffeID}
	if ttl > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(ttl/time.Second)))
	}
	for _, s := range selectors {
		args = append(args, "-selector", s)
	}
	run(t, args...)
}

// TestDelegatedIdentity runs a real SPIRE server and agent on loopback,
// obtains SVIDs for two workload identities through the Delegated Identity
// API, completes a TLS 1.3 mTLS handshake (ALPN h2) between them with the
// identity package's tls.Config builders, watches the short-lived one rotate,
// and checks that the connection made before the rotation keeps working.
//
// It then opens an HBONE tunnel (pkg/hbone's Pool and Server, HTTP/2 CONNECT)
// from web to db with the same Manager and checks bytes flow through it.
func TestDelegatedIdentity(t *testing.T) {
	e := startSPIRE(t)
	web, err := identity.New(trustDomain, "default", "web")
	if err != nil {
		t.Fatal(err)
	}
	db, err := identity.New(trustDomain, "prod", "db")
	if err != nil {
		t.Fatal(err)
	}
	e.register(t, delegateID, 0, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	e.register(t, web.String(), time.Hour, "k8s:ns:default", "k8s:sa:web")
	e.register(t, db.String(), shortTTL, "k8s:ns:prod", "k8s:sa:db")

	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p, err := spire.New(spire.Options{AdminSocket: e.adminSock, WorkloadSocket: e.workloadSock, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- p.Run(ctx) }()
	defer func() { cancel(); <-runDone }()

	// Our own SVID through the Workload API: entries take a few seconds to
	// reach the agent, and until ours has, the agent also refuses us as a delegate.
	var own spiffeid.ID
	deadline := time.Now().Add(45 * time.Second)
	for {
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		svid, err := p.OwnSVID(fctx)
		fcancel()
		if err == nil {
			own = svid.ID
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("own SVID: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if own.String() != delegateID {
		t.Fatalf("own SVID is %s, want %s", own, delegateID)
	}

	m, err := identity.NewManager(identity.Options{
		Provider: p, ProviderName: "spire", Bundles: p, Logger: log, FetchTimeout: 45 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, id := range []identity.Identity{web, db} {
		actx, acancel := context.WithTimeout(ctx, 60*time.Second)
		err := m.Acquire(actx, id)
		acancel()
		if err != nil {
			t.Fatalf("Acquire %s through the delegated API: %v", id, err)
		}
	}
	if err := m.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	dbSVID, err := m.SVID(db)
	if err != nil {
		t.Fatal(err)
	}
	if life := dbSVID.Certificates[0].NotAfter.Sub(dbSVID.Certificates[0].NotBefore); life > shortTTL+time.Minute {
		t.Fatalf("db SVID lives %s, want about %s", life, shortTTL)
	}
	if tds := p.TrustDomains(); len(tds) != 1 || tds[0].Name() != trustDomain {
		t.Fatalf("bundles for %v, want [%s]", tds, trustDomain)
	}

	// mTLS between the two workloads: web dials db.
	scfg, err := m.ServerConfig(identity.StaticServerIdentity(db.SPIFFEID()))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peers := make(chan string, 4)
	go serveEcho(ln, peers)

	ccfg, err := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{db.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}
	first := dialCheck(t, ln.Addr().String(), ccfg, db.SPIFFEID())
	defer first.Close()
	if got := <-peers; got != web.String() {
		t.Fatalf("server saw client %s, want %s", got, web)
	}
	firstSerial := first.ConnectionState().PeerCertificates[0].SerialNumber
	echo(t, first, "before rotation")

	// A client expecting web must refuse db.
	wrong, err := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}
	if c, err := tls.Dial("tcp", ln.Addr().String(), wrong); err == nil {
		c.Close()
		t.Fatal("client expecting web accepted db")
	} else if !strings.Contains(err.Error(), "unexpected ID") {
		t.Fatalf("wrong peer: %v", err)
	}
	<-peers

	// Watch db rotate: SPIRE rotates at half-life, the manager renews at half-life.
	rotateBy := time.Now().Add(2 * shortTTL)
	for {
		s, err := m.SVID(db)
		if err == nil && s.Certificates[0].SerialNumber.Cmp(firstSerial) != 0 {
			t.Logf("db rotated: serial %x → %x", firstSerial, s.Certificates[0].SerialNumber)
			break
		}
		if time.Now().After(rotateBy) {
			t.Fatalf("db SVID did not rotate within %s: %v; certificates %+v", 2*shortTTL, err, m.Certificates())
		}
		time.Sleep(200 * time.Millisecond)
	}
	echo(t, first, "after rotation, same connection")
	second := dialCheck(t, ln.Addr().String(), ccfg, db.SPIFFEID())
	defer second.Close()
	<-peers
	if second.ConnectionState().PeerCertificates[0].SerialNumber.Cmp(firstSerial) == 0 {
		t.Fatal("handshake after rotation presented the old certificate")
	}
	echo(t, second, "new connection")
	for _, ci := range m.Certificates() {
		t.Logf("inspect: %s serial %s valid %s → %s state %s", ci.Identity, ci.Serial, ci.NotBefore.Format(time.TimeOnly), ci.NotAfter.Format(time.TimeOnly), ci.State)
	}

	// A full HBONE tunnel with pkg/hbone on top of the same configurations.
	hboneTunnel(t, m, web, db)

	// An identity with no registration entry: a clear error, not a hang.
	nobody, _ := identity.New(trustDomain, "default", "nobody")
	fctx, fcancel := context.WithTimeout(ctx, 3*time.Second)
	defer fcancel()
	if _, _, err := p.Fetch(fctx, nobody); err == nil || !strings.Contains(err.Error(), "no SVID for selectors [k8s:ns:default k8s:sa:nobody]") {
		t.Fatalf("fetch without an entry = %v", err)
	}
}

func serveEcho(ln net.Listener, peers chan<- string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			tc := c.(*tls.Conn)
			if err := tc.Handshake(); err != nil {
				peers <- "error: " + err.Error()
				return
			}
			id, err := identity.PeerID(tc.ConnectionState())
			if err != nil {
				peers <- "error: " + err.Error()
				return
			}
			peers <- id.String()
			io.Copy(tc, tc)
		}()
	}
}

func dialCheck(t *testing.T, addr string, cfg *tls.Config, want spiffeid.ID) *tls.Conn {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	cs := c.ConnectionState()
	if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != "h2" {
		t.Fatalf("negotiated %s ALPN %q", tls.VersionName(cs.Version), cs.NegotiatedProtocol)
	}
	if got, err := identity.PeerID(cs); err != nil || got != want {
		t.Fatalf("server identity %s, %v; want %s", got, err, want)
	}
	return c
}

func echo(t *testing.T, c *tls.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		t.Fatalf("write: %v", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != msg+"\n" {
		t.Fatalf("echo: %q, %v", line, err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(b, "\n")))
	return len(b), nil
}

// hboneTunnel opens an HBONE CONNECT tunnel from src to dst's HBONE server
// and echoes through it to an upstream on loopback.
func hboneTunnel(t *testing.T, m *identity.Manager, src, dst identity.Identity) {
	t.Helper()
	upstream, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer upstream.Close()
	go func() {
		for {
			c, err := upstream.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()

	scfg, err := m.ServerConfig(identity.StaticServerIdentity(dst.SPIFFEID()))
	if err != nil {
		t.Fatal(err)
	}
	peers := make(chan spiffeid.ID, 1)
	srv, err := hbone.NewServer(hbone.ServerConfig{
		TLS: scfg,
		Handler: hbone.HandlerFunc(func(ctx context.Context, req *hbone.ServerRequest) (net.Conn, error) {
			peers <- req.Peer
			var d net.Dialer
			return d.DialContext(ctx, "tcp", req.Authority.String())
		}),
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()

	pool, err := hbone.NewPool(hbone.PoolConfig{TLS: m, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	st, err := pool.Dial(ctx, hbone.Request{
		Source:    src.SPIFFEID(),
		Expected:  []spiffeid.ID{dst.SPIFFEID()},
		Addr:      netip.MustParseAddrPort(ln.Addr().String()),
		Authority: netip.MustParseAddrPort(upstream.Addr().String()),
	})
	if err != nil {
		t.Fatalf("hbone dial %s → %s: %v", src, dst, err)
	}
	defer st.Close()
	if got := <-peers; got != src.SPIFFEID() {
		t.Fatalf("hbone server saw %s, want %s", got, src)
	}
	if peer, err := identity.PeerID(st.ConnectionState()); err != nil || peer != dst.SPIFFEID() {
		t.Fatalf("hbone client sees %s, %v; want %s", peer, err, dst)
	}
	st.SetDeadline(time.Now().Add(5 * time.Second))
	msg := "through the tunnel"
	if _, err := io.WriteString(st, msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != msg {
		t.Fatalf("tunnel echo %q, %v", buf, err)
	}
}
