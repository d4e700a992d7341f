package istioca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
	"github.com/warren-mesh/warren/pkg/identity/istioca"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

const istiodName = "istiod.istio-system.svc"

// fakeIstiod serves the real IstioCertificateService proto and signs CSRs
// with a built-in CA the way istiod does: the caller must present the bearer
// token, and an ImpersonatedIdentity must match the CSR's SAN.
type fakeIstiod struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca    *builtinca.CA
	token string

	mu      sync.Mutex
	seen    []seenRequest
	respond func(signed []string) ([]string, error) // rewrites the answer when set
}

type seenRequest struct {
	md           metadata.MD
	csr          *x509.CertificateRequest
	impersonated string
	hasMetadata  bool
	validity     int64
}

func (s *fakeIstiod) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+s.token {
		return nil, status.Errorf(codes.Unauthenticated, "authenticate: bad bearer token %q", got)
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, status.Error(codes.InvalidArgument, "csr: no PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr signature: %v", err)
	}
	if len(csr.URIs) != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "csr has %d URI SANs", len(csr.URIs))
	}
	id, err := identity.Parse(csr.URIs[0].String())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr SAN: %v", err)
	}
	imp := req.GetMetadata().GetFields()[istioca.ImpersonatedIdentityKey].GetStringValue()
	if imp != "" && imp != id.String() {
		return nil, status.Errorf(codes.PermissionDenied, "impersonated %s but CSR is for %s", imp, id)
	}
	s.mu.Lock()
	s.seen = append(s.seen, seenRequest{md: md, csr: csr, impersonated: imp, hasMetadata: req.GetMetadata() != nil, validity: req.GetValidityDuration()})
	respond := s.respond
	s.mu.Unlock()

	chain, err := s.ca.Issue(csr.PublicKey, id, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sign: %v", err)
	}
	var out []string
	for _, c := range append(chain, s.ca.Bundle().X509Authorities()...) {
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	if respond != nil {
		return wrap(respond(out))
	}
	return &pb.IstioCertificateResponse{CertChain: out}, nil
}

func wrap(chain []string, err error) (*pb.IstioCertificateResponse, error) {
	if err != nil {
		return nil, err
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

func (s *fakeIstiod) requests() []seenRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seenRequest(nil), s.seen...)
}

// testEnv is a fake istiod with TLS, and a client's options for it.
type testEnv struct {
	istiod    *fakeIstiod
	srv       *grpc.Server
	opts      istioca.Options
	tokenFile string
	ca        *builtinca.CA
}

// newEnv starts a fake istiod on a loopback port.
func newEnv(t *testing.T) *testEnv {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	env := prepareEnv(t, ln.Addr().String(), nil)
	env.serve(ln)
	return env
}

// prepareEnv builds a fake istiod for addr without serving yet. Its CA signs
// at now (time.Now when nil).
func prepareEnv(t *testing.T, addr string, now func() time.Time) *testEnv {
	t.Helper()
	opts := builtinca.Options{TrustDomain: td, Now: now}
	certPEM, keyPEM, err := builtinca.GenerateRoot(opts)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: certPEM, builtinca.KeyFile: keyPEM}, opts)
	if err != nil {
		t.Fatal(err)
	}
	serverCert, roots := servingCert(t, istiodName)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12})))
	fi := &fakeIstiod{ca: ca, token: "token-1"}
	pb.RegisterIstioCertificateServiceServer(srv, fi)
	t.Cleanup(srv.Stop)

	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(tokenFile, []byte("token-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return &testEnv{
		istiod:    fi,
		srv:       srv,
		tokenFile: tokenFile,
		ca:        ca,
		opts: istioca.Options{
			Addr:      addr,
			TLS:       &tls.Config{RootCAs: roots, ServerName: istiodName, MinVersion: tls.VersionTLS12},
			TokenFile: tokenFile,
			ClusterID: "Kubernetes",
		},
	}
}

func (e *testEnv) serve(ln net.Listener) { go e.srv.Serve(ln) }

// servingCert returns a DNS-named server certificate and a pool trusting it.
func servingCert(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

func newClient(t *testing.T, opts istioca.Options) *istioca.Client {
	t.Helper()
	c, err := istioca.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func mustID(t *testing.T, ns, sa string) identity.Identity {
	t.Helper()
	id, err := identity.New(td.Name(), ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestCreateCertificate(t *testing.T) {
	env := newEnv(t)
	self := mustID(t, "istio-system", "ztunnel")
	env.opts.Self = self
	c := newClient(t, env.opts)
	m, err := identity.NewManager(identity.Options{Provider: c, ProviderName: "istio", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	web := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatalf("Acquire through the Istio CA: %v", err)
	}
	svid, err := m.SVID(web)
	if err != nil {
		t.Fatal(err)
	}
	if len(svid.Certificates) != 1 {
		t.Errorf("chain of %d certificates, want the leaf alone (the root goes to the bundle)", len(svid.Certificates))
	}
	if lifetime := svid.Certificates[0].NotAfter.Sub(svid.Certificates[0].NotBefore); lifetime != 24*time.Hour+time.Minute {
		t.Errorf("lifetime %s", lifetime)
	}

	reqs := env.istiod.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	r := reqs[0]
	if got := r.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer token-1" {
		t.Errorf("authorization %q", got)
	}
	if got := r.md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
		t.Errorf("ClusterID %q", got)
	}
	if r.impersonated != web.String() {
		t.Errorf("ImpersonatedIdentity %q, want %q", r.impersonated, web)
	}
	if len(r.csr.URIs) != 1 || r.csr.URIs[0].String() != web.String() || len(r.csr.DNSNames) != 0 {
		t.Errorf("CSR SANs: URIs %v DNS %v", r.csr.URIs, r.csr.DNSNames)
	}
	if k, ok := r.csr.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() || !k.Equal(svid.Certificates[0].PublicKey) {
		t.Errorf("CSR key %T is not the certificate's ECDSA P-256 key", r.csr.PublicKey)
	}
	if r.validity != 86400 {
		t.Errorf("validity_duration %d, want 86400", r.validity)
	}

	// The agent's own identity goes without impersonation; a rotated token is picked up.
	if err := os.WriteFile(env.tokenFile, []byte("token-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	env.istiod.token = "token-2"
	if _, _, err := c.Fetch(t.Context(), self); err != nil {
		t.Fatal(err)
	}
	r = env.istiod.requests()[1]
	if r.hasMetadata || r.impersonated != "" {
		t.Errorf("own identity sent with metadata (impersonated %q)", r.impersonated)
	}
	if got := r.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer token-2" {
		t.Errorf("after token rotation: authorization %q", got)
	}
}

// Each malformed or wrong answer is refused with an error that names it.
func TestRefusesBadResponses(t *testing.T) {
	env := newEnv(t)
	web := mustID(t, "default", "web")
	other := mustID(t, "default", "db")
	pemOf := func(c *x509.Certificate) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	tests := []struct {
		name    string
		respond func([]string) ([]string, error)
		opts    func(*istioca.Options)
		want    string
	}{
		{name: "empty chain", respond: func([]string) ([]string, error) { return nil, nil }, want: "empty certificate chain"},
		{name: "not PEM", respond: func(c []string) ([]string, error) { return []string{"hello"}, nil }, want: "chain element 0: no PEM certificate"},
		{name: "garbled DER", respond: func(c []string) ([]string, error) {
			return []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x03, 1, 2, 3}}))}, nil
		}, want: "chain element 0: x509:"},
		{name: "private key instead of certificate", respond: func(c []string) ([]string, error) {
			return append([]string{string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}))}, c[1:]...), nil
		}, want: `chain element 0: PEM block "PRIVATE KEY", want CERTIFICATE`},
		{name: "leaf for another identity", respond: func(c []string) ([]string, error) {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			chain, err := env.ca.Issue(k.Public(), other, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			return append([]string{pemOf(chain[0])}, c[1:]...), nil
		}, want: "leaf certificate is for spiffe://cluster.local/ns/default/sa/db, requested spiffe://cluster.local/ns/default/sa/web"},
		{name: "leaf for another key", respond: func(c []string) ([]string, error) {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			chain, err := env.ca.Issue(k.Public(), web, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			return append([]string{pemOf(chain[0])}, c[1:]...), nil
		}, want: "leaf certificate is not for the key in the CSR"},
		{name: "no root and no anchors", respond: func(c []string) ([]string, error) { return c[:1], nil },
			want: "chain ends without a self-signed root and no trust anchors are configured"},
		{name: "denied", respond: func([]string) ([]string, error) {
			return nil, status.Error(codes.PermissionDenied, "node is not trusted to impersonate")
		}, want: "PermissionDenied desc = node is not trusted to impersonate"},
		{name: "wrong token", opts: func(o *istioca.Options) {
			f := filepath.Join(t.TempDir(), "token")
			os.WriteFile(f, []byte("stolen"), 0o600)
			o.TokenFile = f
		}, want: "Unauthenticated desc = authenticate: bad bearer token"},
		{name: "empty token", opts: func(o *istioca.Options) {
			f := filepath.Join(t.TempDir(), "token")
			os.WriteFile(f, []byte("\n"), 0o600)
			o.TokenFile = f
		}, want: "is empty"},
		{name: "missing token file", opts: func(o *istioca.Options) { o.TokenFile = "/nonexistent/token" },
			want: "read token: open /nonexistent/token"},
		{name: "chain not from the configured anchors", opts: func(o *istioca.Options) {
			// Configured anchors win over the root the CA sends.
			other, _, _ := builtinca.GenerateRoot(builtinca.Options{TrustDomain: td})
			b, _ := pem.Decode(other)
			c, _ := x509.ParseCertificate(b.Bytes)
			o.Roots = []*x509.Certificate{c}
		}, want: "verify chain against the trust bundle of cluster.local"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env.istiod.mu.Lock()
			env.istiod.respond = tt.respond
			env.istiod.mu.Unlock()
			opts := env.opts
			if tt.opts != nil {
				tt.opts(&opts)
			}
			m, err := identity.NewManager(identity.Options{Provider: newClient(t, opts), ProviderName: "istio", Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			err = m.Acquire(t.Context(), web)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Acquire = %v\nwant error containing %q", err, tt.want)
			}
			if _, err := m.SVID(web); err == nil {
				t.Fatal("refused certificate in use")
			}
		})
	}
}

// With the CA down, the Manager backs off, stays up, says why it is not
// ready, and recovers once the CA answers.
func TestCAUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now

	env := prepareEnv(t, addr, nil)
	clk := fakeclock.New(time.Now())
	m, err := identity.NewManager(identity.Options{Provider: newClient(t, env.opts), ProviderName: "istiod", Clock: clk, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	web := mustID(t, "default", "web")
	err = m.Acquire(t.Context(), web)
	if err == nil || !strings.Contains(err.Error(), "CA unreachable at "+addr) {
		t.Fatalf("Acquire with the CA down = %v", err)
	}
	rerr := m.Ready()
	want := fmt.Sprintf("fetch %s (provider istiod): create certificate for %s: CA unreachable at %s: ", web, web, addr)
	if rerr == nil || !strings.HasPrefix(rerr.Error(), want) || !strings.HasSuffix(rerr.Error(), ": retrying in 500ms") {
		t.Fatalf("Ready() = %v\nwant %q ... retrying in 500ms", rerr, want)
	}
	clk.Advance(500 * time.Millisecond)
	waitFor(t, func() bool { return strings.HasSuffix(fmt.Sprint(m.Ready()), "retrying in 1s") })

	// The CA comes up on that address; the next retries get through (gRPC
	// has its own reconnect back-off, so allow a few).
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	env.serve(ln)
	waitFor(t, func() bool {
		if m.Ready() == nil {
			return true
		}
		clk.Advance(2 * time.Second)
		time.Sleep(50 * time.Millisecond)
		return false
	})
	if _, err := m.SVID(web); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestNewValidates(t *testing.T) {
	for _, o := range []istioca.Options{
		{TLS: &tls.Config{}, TokenFile: "x"},
		{Addr: "a:1", TokenFile: "x"},
		{Addr: "a:1", TLS: &tls.Config{}},
	} {
		if _, err := istioca.New(o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
}

// The Manager renews istiod certificates at half-life without a restart: each
// renewal is a new CreateCertificate call (a new key, impersonating the same
// identity) whose certificate replaces the old one.
func TestManagerRotatesIstiodCertificates(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	env := prepareEnv(t, ln.Addr().String(), clk.Now)
	env.serve(ln)
	env.opts.TTL = time.Hour
	m, err := identity.NewManager(identity.Options{Provider: newClient(t, env.opts), ProviderName: "istiod", Clock: clk, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	web := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	settled := func(ci identity.CertInfo) bool { return ci.State == identity.StateValid && !ci.NextRefresh.IsZero() }
	cur := waitCert(t, m, settled)
	if cur.Provider != "istiod" {
		t.Fatalf("inspect view names provider %q, want istiod", cur.Provider)
	}
	for i := range 2 {
		clk.Advance(cur.NextRefresh.Sub(clk.Now()) + time.Second)
		next := waitCert(t, m, func(ci identity.CertInfo) bool { return ci.Serial != cur.Serial && settled(ci) })
		if !next.NotAfter.After(cur.NotAfter) {
			t.Fatalf("rotation %d: new certificate expires %s, not after %s", i+1, next.NotAfter, cur.NotAfter)
		}
		reqs := env.istiod.requests()
		if len(reqs) != i+2 {
			t.Fatalf("rotation %d: %d CreateCertificate calls, want %d", i+1, len(reqs), i+2)
		}
		if last := reqs[len(reqs)-1]; last.impersonated != web.String() || last.validity != 3600 {
			t.Fatalf("rotation %d: renewal impersonated %q for %ds", i+1, last.impersonated, last.validity)
		}
		cur = next
	}
	if err := m.Ready(); err != nil {
		t.Fatalf("Ready after rotations: %v", err)
	}
}

// waitCert polls the Manager's only certificate until ok accepts it.
func waitCert(t *testing.T, m *identity.Manager, ok func(identity.CertInfo) bool) identity.CertInfo {
	t.Helper()
	var last []identity.CertInfo
	waitFor(t, func() bool {
		last = m.Certificates()
		return len(last) == 1 && ok(last[0])
	})
	return last[0]
}
