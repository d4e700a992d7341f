package spire_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/spire"
	"github.com/warren-mesh/warren/pkg/identity/spire/spiretest"
)

const (
	trustDomain = "cluster.local"
	// delegateID is this test's own identity, authorized as a delegate.
	delegateID = "spiffe://" + trustDomain + "/warren/nodeagent"
	// shortTTL is the lifetime of the identity the test watches rotate.
	shortTTL = 20 * time.Second
)

// TestDelegatedIdentity runs a real SPIRE server and agent on loopback,
// obtains SVIDs for two workload identities through the Delegated Identity
// API, completes a TLS 1.3 mTLS handshake (ALPN h2) between them with the
// identity package's tls.Config builders, watches the short-lived one rotate,
// and checks that the connection made before the rotation keeps working.
//
// It then opens an HBONE tunnel (pkg/hbone's Pool and Server, HTTP/2 CONNECT)
// from web to db with the same Manager and checks bytes flow through it.
func TestDelegatedIdentity(t *testing.T) {
	e := spiretest.Start(t, spiretest.Options{TrustDomain: trustDomain, Delegates: []string{delegateID}})
	web, err := identity.New(trustDomain, "default", "web")
	if err != nil {
		t.Fatal(err)
	}
	db, err := identity.New(trustDomain, "prod", "db")
	if err != nil {
		t.Fatal(err)
	}
	// Until our own entry has reached the agent, it refuses us as a delegate.
	e.RegisterSelf(t, delegateID)
	e.Register(t, web.String(), time.Hour, "k8s:ns:default", "k8s:sa:web")
	e.Register(t, db.String(), shortTTL, "k8s:ns:prod", "k8s:sa:db")

	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p, err := spire.New(spire.Options{AdminSocket: e.AdminSocket, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- p.Run(ctx) }()
	defer func() { cancel(); <-runDone }()

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
	if b, err := p.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString(trustDomain)); err != nil || len(b.X509Authorities()) == 0 {
		t.Fatalf("bundle of %s from the agent: %v, %v", trustDomain, b, err)
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
			id, err := peerID(tc.ConnectionState())
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
	if got, err := peerID(cs); err != nil || got != want {
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

// peerID is the SPIFFE ID of a verified peer's leaf certificate.
func peerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
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
	if peer, err := peerID(st.ConnectionState()); err != nil || peer != dst.SPIFFEID() {
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
