package identity_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
)

// echoServer accepts TLS connections on a loopback address, reports each
// handshake's outcome, and echoes what it reads.
type echoServer struct {
	ln      net.Listener
	results chan serverResult
}

type serverResult struct {
	peer spiffeid.ID
	err  error
}

func startEchoServer(t *testing.T, addr string, cfg *tls.Config) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	s := &echoServer{ln: ln, results: make(chan serverResult, 16)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := tls.Server(c, cfg)
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if err := tc.Handshake(); err != nil {
					s.results <- serverResult{err: err}
					return
				}
				c.SetDeadline(time.Time{})
				peer, err := peerID(tc.ConnectionState())
				s.results <- serverResult{peer: peer, err: err}
				io.Copy(tc, tc)
			}()
		}
	}()
	return s
}

func (s *echoServer) addr() string { return s.ln.Addr().String() }

func (s *echoServer) result(t *testing.T) serverResult {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("server reported no handshake")
		return serverResult{}
	}
}

func dial(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c.(*tls.Conn), nil
}

func echo(t *testing.T, c *tls.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: %q, %v", buf, err)
	}
}

// peerID is the SPIFFE ID of a verified peer's leaf certificate.
func peerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}

// Two workloads on one node, each with its own listener presenting its own
// identity (as the agent opens one HBONE listener per pod): the client
// accepts only the identity it expects, and each end sees the other's ID.
func TestMutualTLS(t *testing.T) {
	clk := fakeclock.New(start)
	m := newManager(t, newScripted(newCA(t, clk.Now, 24*time.Hour)), clk)
	web, db := mustID(t, "default", "web"), mustID(t, "prod", "db")
	for _, id := range []identity.Identity{web, db} {
		if err := m.Acquire(t.Context(), id); err != nil {
			t.Fatal(err)
		}
	}
	serve := func(id identity.Identity) *echoServer {
		scfg, err := m.ServerConfig(identity.StaticServerIdentity(id.SPIFFEID()))
		if err != nil {
			t.Fatal(err)
		}
		return startEchoServer(t, "127.0.0.1:0", scfg)
	}
	webSrv, dbSrv := serve(web), serve(db)

	t.Run("expected peer", func(t *testing.T) {
		ccfg, err := m.ClientConfig(db.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
		if err != nil {
			t.Fatal(err)
		}
		c, err := dial(t, webSrv.addr(), ccfg)
		if err != nil {
			t.Fatalf("handshake db → web: %v", err)
		}
		cs := c.ConnectionState()
		if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != "h2" ||
			(cs.CipherSuite != tls.TLS_AES_128_GCM_SHA256 && cs.CipherSuite != tls.TLS_AES_256_GCM_SHA384) {
			t.Fatalf("negotiated %s %s ALPN %q", tls.VersionName(cs.Version), tls.CipherSuiteName(cs.CipherSuite), cs.NegotiatedProtocol)
		}
		if peer, err := peerID(cs); err != nil || peer != web.SPIFFEID() {
			t.Fatalf("client sees %s, %v; want %s", peer, err, web)
		}
		if r := webSrv.result(t); r.err != nil || r.peer != db.SPIFFEID() {
			t.Fatalf("server sees %s, %v; want %s", r.peer, r.err, db)
		}
		echo(t, c, "hello")
	})

	t.Run("unexpected peer refused", func(t *testing.T) {
		ccfg, err := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
		if err != nil {
			t.Fatal(err)
		}
		_, err = dial(t, dbSrv.addr(), ccfg)
		if err == nil || !strings.Contains(err.Error(), `unexpected ID "spiffe://cluster.local/ns/prod/sa/db"`) {
			t.Fatalf("handshake web → db expecting web = %v", err)
		}
		if r := dbSrv.result(t); r.err == nil {
			t.Fatal("server completed a handshake the client refused")
		}
	})

	t.Run("chooser error refuses the handshake", func(t *testing.T) {
		scfg, err := m.ServerConfig(func(*tls.ClientHelloInfo) (spiffeid.ID, error) {
			return spiffeid.ID{}, errors.New("no workload on this node owns 127.0.0.1")
		})
		if err != nil {
			t.Fatal(err)
		}
		srv := startEchoServer(t, "127.0.0.1:0", scfg)
		ccfg, _ := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{db.SPIFFEID()})
		if _, err := dial(t, srv.addr(), ccfg); err == nil {
			t.Fatal("handshake succeeded without a server identity")
		}
		if r := srv.result(t); r.err == nil || !strings.Contains(r.err.Error(), "no workload on this node owns 127.0.0.1") {
			t.Fatalf("server error = %v", r.err)
		}
		if _, err := m.ServerConfig(nil); err == nil {
			t.Fatal("ServerConfig without a chooser")
		}
	})

	t.Run("client config checks", func(t *testing.T) {
		if _, err := m.ClientConfig(mustID(t, "x", "y").SPIFFEID(), []spiffeid.ID{web.SPIFFEID()}); err == nil ||
			!strings.Contains(err.Error(), "not held") {
			t.Fatalf("ClientConfig for an identity not held = %v", err)
		}
		if _, err := m.ClientConfig(web.SPIFFEID(), nil); err == nil {
			t.Fatal("ClientConfig without expected peers")
		}
		if _, err := m.ClientConfig(spiffeid.RequireFromString("spiffe://cluster.local/not-a-workload"), []spiffeid.ID{web.SPIFFEID()}); err == nil {
			t.Fatal("ClientConfig with a non-workload source ID")
		}
	})
}

// Every configuration the Manager builds carries HBONE's TLS rules, which
// hbone.HardenTLS owns: the client's, the server's, and the per-client one
// the server picks during the handshake.
func TestConfigsCarryHBONERules(t *testing.T) {
	clk := fakeclock.New(start)
	m := newManager(t, newScripted(newCA(t, clk.Now, 24*time.Hour)), clk)
	web := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	client, err := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}
	server, err := m.ServerConfig(identity.StaticServerIdentity(web.SPIFFEID()))
	if err != nil {
		t.Fatal(err)
	}
	perClient, err := server.GetConfigForClient(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		cfg  *tls.Config
	}{{"client", client}, {"server", server}, {"server, per client", perClient}} {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.cfg
			if c.MinVersion != tls.VersionTLS13 || c.MaxVersion != tls.VersionTLS13 {
				t.Errorf("versions %x..%x, want TLS 1.3 only", c.MinVersion, c.MaxVersion)
			}
			if len(c.NextProtos) != 1 || c.NextProtos[0] != hbone.ALPN {
				t.Errorf("NextProtos %q, want [%s]", c.NextProtos, hbone.ALPN)
			}
			if !c.SessionTicketsDisabled || c.ClientSessionCache != nil {
				t.Errorf("session resumption possible")
			}
			err := c.VerifyConnection(tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_CHACHA20_POLY1305_SHA256, NegotiatedProtocol: hbone.ALPN})
			if err == nil || !strings.Contains(err.Error(), "HBONE needs AES-GCM") {
				t.Errorf("ChaCha20 handshake: VerifyConnection = %v, want a refusal", err)
			}
		})
	}
}

// A client that does not speak h2 completes a TLS handshake with the
// Manager's server configuration (Go's server goes on without ALPN) and is
// then refused by hbone.Server, which counts it as an ALPN refusal: the check
// is HBONE's, made once, after the handshake.
func TestHBONEServerRefusesWithoutALPN(t *testing.T) {
	clk := fakeclock.New(start)
	m := newManager(t, newScripted(newCA(t, clk.Now, 24*time.Hour)), clk)
	web := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	scfg, err := m.ServerConfig(identity.StaticServerIdentity(web.SPIFFEID()))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := hbone.NewServer(hbone.ServerConfig{
		TLS: scfg,
		Handler: hbone.HandlerFunc(func(context.Context, *hbone.ServerRequest) (net.Conn, error) {
			return nil, errors.New("no request expected")
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
	t.Cleanup(func() { srv.Close() })
	good, err := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}
	for i, protos := range [][]string{nil, {"http/1.1"}} {
		t.Run(fmt.Sprintf("ALPN %q", protos), func(t *testing.T) {
			cfg := good.Clone()
			cfg.NextProtos = protos
			c, err := dial(t, ln.Addr().String(), cfg)
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err == nil {
				t.Fatal("server kept a connection without h2")
			}
			eventually(t, "ALPN refusal counted", func() bool { return srv.Stats().Refused[hbone.RefusedALPN] == uint64(i+1) })
		})
	}
}

// Whatever the client offers, the server holds out for TLS 1.3, no ALPN but
// h2, and a client certificate from its trust domain. (A client offering no
// ALPN at all is hbone.Server's to refuse: TestHBONEServerRefusesWithoutALPN.)
func TestServerRefusesNonHBONEClients(t *testing.T) {
	clk := fakeclock.New(start)
	m := newManager(t, newScripted(newCA(t, clk.Now, 24*time.Hour)), clk)
	web := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	scfg, err := m.ServerConfig(identity.StaticServerIdentity(web.SPIFFEID()))
	if err != nil {
		t.Fatal(err)
	}
	srv := startEchoServer(t, "127.0.0.1:0", scfg)
	good, err := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}

	// lax is a good client without its own checks, so the server's show.
	lax := func() *tls.Config { c := good.Clone(); c.VerifyConnection = nil; return c }

	// A workload of another trust domain, with its own CA.
	otherTD := spiffeid.RequireTrustDomainFromString("other.example")
	otherCA := newOtherTDCA(t, otherTD, clk.Now)
	foreign := identity.Identity{TrustDomain: otherTD, Namespace: "default", ServiceAccount: "web"}
	om := newManager(t, otherCA, clk, func(o *identity.Options) {
		// It trusts both domains, so only the server's check can refuse it.
		o.Bundles = x509bundle.NewSet(otherCA.Bundle(), must(m.Bundles().GetX509BundleForTrustDomain(testTD)))
	})
	if err := om.Acquire(t.Context(), foreign); err != nil {
		t.Fatal(err)
	}
	foreignCfg, err := om.ClientConfig(foreign.SPIFFEID(), []spiffeid.ID{web.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name      string
		cfg       func() *tls.Config
		serverErr string
	}{
		{"TLS 1.2 only", func() *tls.Config {
			c := lax()
			c.MaxVersion = tls.VersionTLS12
			c.MinVersion = tls.VersionTLS12
			return c
		}, "unsupported versions"},
		{"ALPN h3", func() *tls.Config { c := lax(); c.NextProtos = []string{"h3"}; return c }, "unsupported application protocols"},
		{"no client certificate", func() *tls.Config { c := good.Clone(); c.GetClientCertificate = nil; return c }, "client didn't provide a certificate"},
		{"client from another trust domain", func() *tls.Config { return foreignCfg }, `verify client certificate: x509svid: could not get X509 bundle: x509bundle: no X.509 bundle for trust domain "other.example"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := dial(t, srv.addr(), tt.cfg())
			if err == nil {
				// In TLS 1.3 the client may finish before the server rejects its certificate.
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, err = c.Read(make([]byte, 1))
			}
			if err == nil {
				t.Fatal("connection accepted")
			}
			if r := srv.result(t); r.err == nil || !strings.Contains(r.err.Error(), tt.serverErr) {
				t.Fatalf("server error = %v, want %q", r.err, tt.serverErr)
			}
		})
	}
	// And the good client still gets in.
	c, err := dial(t, srv.addr(), good)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, c, "ok")
	if r := srv.result(t); r.err != nil {
		t.Fatal(r.err)
	}
}

// Rotation changes what new handshakes present; a connection made before it
// keeps working.
func TestRotationKeepsConnections(t *testing.T) {
	clk := fakeclock.New(start)
	m := newManager(t, newScripted(newCA(t, clk.Now, 24*time.Hour)), clk)
	web, db := mustID(t, "default", "web"), mustID(t, "prod", "db")
	for _, id := range []identity.Identity{web, db} {
		if err := m.Acquire(t.Context(), id); err != nil {
			t.Fatal(err)
		}
		eventually(t, "settled", func() bool { return settled(m, id) })
	}
	scfg, _ := m.ServerConfig(identity.StaticServerIdentity(db.SPIFFEID()))
	srv := startEchoServer(t, "127.0.0.1:0", scfg)
	ccfg, _ := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{db.SPIFFEID()})

	old, err := dial(t, srv.addr(), ccfg)
	if err != nil {
		t.Fatal(err)
	}
	srv.result(t)
	echo(t, old, "before")
	oldSerial := old.ConnectionState().PeerCertificates[0].SerialNumber

	clk.Advance(12*time.Hour + 31*time.Second)
	eventually(t, "rotation", func() bool {
		return settled(m, db) && settled(m, web) && certInfo(t, m, db).Serial != fmt.Sprintf("%x", oldSerial)
	})
	echo(t, old, "after rotation, same connection")

	fresh, err := dial(t, srv.addr(), ccfg)
	if err != nil {
		t.Fatalf("handshake after rotation: %v", err)
	}
	srv.result(t)
	newSerial := fresh.ConnectionState().PeerCertificates[0].SerialNumber
	if newSerial.Cmp(oldSerial) == 0 {
		t.Fatal("new handshake presented the old certificate")
	}
	if got := fmt.Sprintf("%x", newSerial); got != certInfo(t, m, db).Serial {
		t.Fatalf("presented serial %s, manager holds %s", got, certInfo(t, m, db).Serial)
	}
	echo(t, fresh, "fresh")
}

// When the CA adds a root, peers with certificates from it are accepted after
// the next fetch brings the new bundle.
func TestBundleUpdate(t *testing.T) {
	clk := fakeclock.New(start)
	caA := newCA(t, clk.Now, 24*time.Hour)
	caB := newCA(t, clk.Now, 24*time.Hour)
	web, db := mustID(t, "default", "web"), mustID(t, "prod", "db")

	// The server's CA is A; its provider will start announcing B's root too.
	pA := newScripted(caA)
	srvM := newManager(t, pA, clk)
	if err := srvM.Acquire(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	eventually(t, "settled", func() bool { return settled(srvM, db) })
	scfg, _ := srvM.ServerConfig(identity.StaticServerIdentity(db.SPIFFEID()))
	srv := startEchoServer(t, "127.0.0.1:0", scfg)

	// The client's certificates come from B; it trusts A and B.
	cliM := newManager(t, newScripted(caB), clk, func(o *identity.Options) {
		o.Bundles = x509bundle.FromX509Authorities(testTD, append(caA.Bundle().X509Authorities(), caB.Bundle().X509Authorities()...))
	})
	if err := cliM.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	ccfg, _ := cliM.ClientConfig(web.SPIFFEID(), []spiffeid.ID{db.SPIFFEID()})

	tryConnect := func() error {
		c, err := dial(t, srv.addr(), ccfg)
		if err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, "x")
			_, err = c.Read(make([]byte, 1))
		}
		if r := srv.result(t); r.err != nil {
			return r.err
		}
		return err
	}
	if err := tryConnect(); err == nil || !strings.Contains(err.Error(), "verify client certificate") {
		t.Fatalf("client from B before the bundle update: %v", err)
	}

	pA.mu.Lock()
	pA.rewrite = func(s *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
		nb := b.Clone()
		for _, r := range caB.Bundle().X509Authorities() {
			nb.AddX509Authority(r)
		}
		return s, nb
	}
	pA.mu.Unlock()
	clk.Advance(12*time.Hour + 31*time.Second)
	eventually(t, "renewal", func() bool { return pA.count(db) == 2 && settled(srvM, db) })
	if err := tryConnect(); err != nil {
		t.Fatalf("client from B after the bundle update: %v", err)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
