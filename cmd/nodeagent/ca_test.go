package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/spire/spiretest"
)

const testTD = "cluster.local"

// parseCAFlags parses args into caOptions and validates them as run does.
func parseCAFlags(t *testing.T, args ...string) (*caOptions, error) {
	t.Helper()
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	c := &caOptions{}
	c.addFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	if err := applyEnv(fs); err != nil {
		return nil, err
	}
	return c, c.validate(fs.Changed)
}

func TestCAProviderFlags(t *testing.T) {
	for _, tt := range []struct {
		name    string
		args    []string
		env     map[string]string
		want    string // the provider chosen, when valid
		wantErr string
	}{
		{name: "default is builtin", want: "builtin"},
		{name: "builtin with its flags", args: []string{"--ca-provider=builtin", "--ca-dir=/x", "--ca-generate"}, want: "builtin"},
		{name: "spire", args: []string{"--ca-provider=spire", "--spire-admin-socket=/run/spire/admin.sock"}, want: "spire"},
		{name: "istiod with defaults", args: []string{"--ca-provider=istiod"}, want: "istiod"},
		{name: "istiod with its flags", args: []string{"--ca-provider=istiod", "--istiod-addr=istiod.x.svc:15012", "--istiod-root-ca=/r", "--istiod-token-file=/t"}, want: "istiod"},
		{name: "from the environment", env: map[string]string{"WARREN_CA_PROVIDER": "spire", "WARREN_SPIRE_ADMIN_SOCKET": "/s"}, want: "spire"},
		{name: "command line wins", args: []string{"--ca-provider=builtin"}, env: map[string]string{"WARREN_CA_PROVIDER": "istiod"}, want: "builtin"},
		{name: "warren with defaults", args: []string{"--ca-provider=warren"}, want: "warren"},
		{name: "warren with its flags", args: []string{"--ca-provider=warren", "--ca-addr=warren-ca.x.svc:15012", "--ca-root-cert=/r", "--ca-token-file=/t"}, want: "warren"},
		{name: "warren's flags without warren", args: []string{"--ca-provider=builtin", "--ca-addr=warren-ca.x.svc:15012"},
			wantErr: "--ca-provider=builtin ignores --ca-addr (for --ca-provider=warren)"},
		{name: "CA directory with warren: the agent holds no key", args: []string{"--ca-provider=warren", "--ca-dir=/x"},
			wantErr: "--ca-provider=warren ignores --ca-dir (for --ca-provider=builtin)"},
		{name: "unknown", args: []string{"--ca-provider=vault"}, wantErr: `--ca-provider "vault": want one of builtin, spire, istiod, warren (WARREN_CA_PROVIDER)`},
		{name: "empty", args: []string{"--ca-provider="}, wantErr: "want one of builtin, spire, istiod, warren"},
		{name: "unknown from the environment", env: map[string]string{"WARREN_CA_PROVIDER": "Builtin"}, wantErr: `--ca-provider "Builtin": want one of`},
		{name: "spire without socket", args: []string{"--ca-provider=spire"}, wantErr: "--ca-provider=spire needs --spire-admin-socket (WARREN_SPIRE_ADMIN_SOCKET)"},
		{name: "spire socket without spire", args: []string{"--spire-admin-socket=/s"},
			wantErr: "--ca-provider=builtin ignores --spire-admin-socket (for --ca-provider=spire): remove it or select that provider"},
		{name: "istiod flags without istiod", env: map[string]string{"WARREN_ISTIOD_ADDR": "istiod:15012"}, args: []string{"--ca-provider=builtin"},
			wantErr: "ignores --istiod-addr (for --ca-provider=istiod)"},
		{name: "CA directory with spire", args: []string{"--ca-provider=spire", "--spire-admin-socket=/s", "--ca-dir=/x", "--ca-generate"},
			wantErr: "--ca-provider=spire ignores --ca-dir (for --ca-provider=builtin), --ca-generate (for --ca-provider=builtin)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			c, err := parseCAFlags(t, tt.args...)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.provider != tt.want {
				t.Fatalf("provider %q, want %q", c.provider, tt.want)
			}
		})
	}
}

// TestIdentityStackPerProvider builds each --ca-provider through
// newIdentityStack, as run does, against a stand-in for its CA: the Manager
// gets a certificate for a pod's identity, says which provider issued it, and,
// when the CA refuses or is unreachable, names the provider and the cause.
func TestIdentityStackPerProvider(t *testing.T) {
	web := mustIdentity(t, "default", "web")
	for _, tt := range []struct {
		name string
		// good returns flags for a working CA; bad for one that fails with wantBad.
		good, bad func(t *testing.T) []string
		wantBad   string
	}{
		{
			name: "builtin",
			good: func(t *testing.T) []string {
				return []string{"--ca-provider=builtin", "--ca-dir", filepath.Join(t.TempDir(), "ca"), "--ca-generate"}
			},
			bad: func(t *testing.T) []string {
				return []string{"--ca-provider=builtin", "--ca-dir", filepath.Join(t.TempDir(), "ca"), "--ca-generate"}
			},
			wantBad: "refused: no pod on this node has this identity",
		},
		{
			name: "spire",
			good: func(t *testing.T) []string {
				return []string{"--ca-provider=spire", "--spire-admin-socket", startFakeSPIRE(t)}
			},
			bad: func(t *testing.T) []string {
				return []string{"--ca-provider=spire", "--spire-admin-socket", filepath.Join(t.TempDir(), "admin.sock")}
			},
			wantBad: "SPIRE agent unreachable at",
		},
		{
			name:    "istiod",
			good:    func(t *testing.T) []string { return startFakeIstiod(t, "token-1").flags("token-1") },
			bad:     func(t *testing.T) []string { return startFakeIstiod(t, "token-1").flags("stolen") },
			wantBad: "Unauthenticated",
		},
		{
			// warren's CA service (pkg/caserver) through the same client.
			name:    "warren",
			good:    func(t *testing.T) []string { return startWarrenCA(t, "token-1", "token-1") },
			bad:     func(t *testing.T) []string { return startWarrenCA(t, "token-1", "stolen") },
			wantBad: "refused (token_invalid)",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Run("issues", func(t *testing.T) {
				s := startStack(t, tt.good(t), func(identity.Identity) bool { return true })
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				defer cancel()
				if err := s.certs.Acquire(ctx, web); err != nil {
					t.Fatalf("Acquire through %s: %v", tt.name, err)
				}
				cis := s.certs.Certificates()
				if len(cis) != 1 || cis[0].Provider != tt.name || cis[0].State != identity.StateValid || cis[0].Serial == "" {
					t.Fatalf("inspect view %+v, want one valid certificate from %s", cis, tt.name)
				}
				if err := s.certs.Ready(); err != nil {
					t.Fatalf("Ready = %v", err)
				}
			})
			t.Run("says why not", func(t *testing.T) {
				s := startStack(t, tt.bad(t), func(identity.Identity) bool { return false })
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				defer cancel()
				err := s.certs.Acquire(ctx, web)
				if err == nil || !strings.Contains(err.Error(), "(provider "+tt.name+")") || !strings.Contains(err.Error(), tt.wantBad) {
					t.Fatalf("Acquire = %v, want an error naming provider %s and %q", err, tt.name, tt.wantBad)
				}
				rerr := s.certs.Ready()
				if rerr == nil || !strings.Contains(rerr.Error(), "fetch "+web.String()+" (provider "+tt.name+")") || !strings.Contains(rerr.Error(), tt.wantBad) {
					t.Fatalf("Ready = %v, want the identity, provider %s and %q", rerr, tt.name, tt.wantBad)
				}
				ci := s.certs.Certificates()[0]
				if ci.Provider != tt.name || ci.State != identity.StateUnavailable || !strings.Contains(ci.LastError, tt.wantBad) {
					t.Fatalf("inspect view %+v", ci)
				}
			})
		})
	}
}

// TestIstiodRootCAChecks: missing or unusable files stop the stack at start,
// naming the flag.
func TestIstiodRootCAChecks(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	token := filepath.Join(dir, "token")
	for _, f := range []string{junk, token} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"missing root", []string{"--istiod-root-ca", filepath.Join(dir, "none.pem"), "--istiod-token-file", token}, "--istiod-root-ca: open"},
		{"root without a certificate", []string{"--istiod-root-ca", junk, "--istiod-token-file", token}, "--istiod-root-ca " + junk + ": no PEM certificate in it"},
		{"missing token", []string{"--istiod-root-ca", startFakeIstiod(t, "t").root, "--istiod-token-file", filepath.Join(dir, "none")}, "--istiod-token-file: stat"},
		{"address without port", []string{"--istiod-addr", "istiod", "--istiod-root-ca", junk, "--istiod-token-file", token}, "--istiod-addr \"istiod\": want host:port"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseCAFlags(t, append([]string{"--ca-provider=istiod"}, tt.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			_, err = newIdentityStack(c, testDeps(func(identity.Identity) bool { return true }))
			if err == nil || !strings.Contains(err.Error(), "--ca-provider=istiod: "+tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
}

// TestIdentityStackRealSPIRE starts the identity stack exactly as
// --ca-provider=spire does against a real SPIRE server and agent: the agent
// authorizes this process as a delegate, issues a pod identity by its
// Kubernetes selectors, and rotates it (a 20 s SVID) while the stack runs,
// without a restart; an identity without a registration entry is reported
// with the provider's name and the selectors asked for.
func TestIdentityStackRealSPIRE(t *testing.T) {
	const delegate = "spiffe://" + testTD + "/warren/nodeagent"
	e := spiretest.Start(t, spiretest.Options{TrustDomain: testTD, Delegates: []string{delegate}})
	web := mustIdentity(t, "default", "web")
	e.RegisterSelf(t, delegate)
	e.Register(t, web.String(), 20*time.Second, "k8s:ns:default", "k8s:sa:web")

	s := startStack(t, []string{"--ca-provider=spire", "--spire-admin-socket", e.AdminSocket}, func(identity.Identity) bool { return true })
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	if err := s.certs.Acquire(ctx, web); err != nil {
		t.Fatalf("Acquire from SPIRE: %v", err)
	}
	first := s.certs.Certificates()[0]
	if first.Provider != "spire" || first.State != identity.StateValid {
		t.Fatalf("inspect view %+v", first)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		ci := s.certs.Certificates()[0]
		if ci.Serial != first.Serial && ci.State == identity.StateValid {
			t.Logf("rotated without a restart: serial %s → %s, expiry %s → %s", first.Serial, ci.Serial, first.NotAfter.Format(time.TimeOnly), ci.NotAfter.Format(time.TimeOnly))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no rotation within 60 s: %+v", ci)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err := s.certs.Ready(); err != nil {
		t.Fatalf("Ready after rotation: %v", err)
	}

	nobody := mustIdentity(t, "default", "nobody")
	actx, acancel := context.WithTimeout(ctx, 3*time.Second)
	defer acancel()
	err := s.certs.Acquire(actx, nobody)
	if err == nil || !strings.Contains(err.Error(), "(provider spire)") {
		t.Fatalf("Acquire without an entry = %v", err)
	}
	waitFor(t, 40*time.Second, func() bool {
		return strings.Contains(strings.Join(errLines(s.certs.Ready()), "\n"), "fetch "+nobody.String()+" (provider spire): fetch "+nobody.String()+" from spire: no SVID for selectors [k8s:ns:default k8s:sa:nobody]")
	})
}

func errLines(err error) []string {
	if err == nil {
		return nil
	}
	return strings.Split(err.Error(), "\n")
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func mustIdentity(t *testing.T, ns, sa string) identity.Identity {
	t.Helper()
	id, err := identity.New(testTD, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func testDeps(nodeHas func(identity.Identity) bool) identityDeps {
	return identityDeps{
		trustDomain: spiffeid.RequireTrustDomainFromString(testTD),
		clusterID:   "Kubernetes",
		nodeHas:     nodeHas,
		log:         slog.New(slog.DiscardHandler),
		registry:    prometheus.NewRegistry(),
	}
}

// startStack parses args as run does, builds the stack, runs it until the
// test ends, and closes it.
func startStack(t *testing.T, args []string, nodeHas func(identity.Identity) bool) *identityStack {
	t.Helper()
	c, err := parseCAFlags(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	s, err := newIdentityStack(c, testDeps(nodeHas))
	if err != nil {
		t.Fatal(err)
	}
	if s.name != c.provider {
		t.Fatalf("stack named %q for --ca-provider=%s", s.name, c.provider)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if s.run != nil {
			s.run(ctx)
		}
	}()
	t.Cleanup(func() { cancel(); <-done; s.close() })
	return s
}

// newTestCA is a built-in CA standing in for SPIRE's and istiod's.
func newTestCA(t *testing.T) *builtinca.CA {
	t.Helper()
	opts := builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString(testTD)}
	c, k, err := builtinca.GenerateRoot(opts)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: c, builtinca.KeyFile: k}, opts)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// fakeSPIRE serves the Delegated Identity API: each SVID subscription gets
// an SVID for the identity its k8s:ns and k8s:sa selectors name.
type fakeSPIRE struct {
	delegatedv1.UnimplementedDelegatedIdentityServer
	ca *builtinca.CA
}

func (f *fakeSPIRE) SubscribeToX509SVIDs(req *delegatedv1.SubscribeToX509SVIDsRequest, s delegatedv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	var ns, sa string
	for _, sel := range req.GetSelectors() {
		if v, ok := strings.CutPrefix(sel.GetValue(), "ns:"); ok && sel.GetType() == "k8s" {
			ns = v
		}
		if v, ok := strings.CutPrefix(sel.GetValue(), "sa:"); ok && sel.GetType() == "k8s" {
			sa = v
		}
	}
	id, err := identity.New(testTD, ns, sa)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "selectors: %v", err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := f.ca.Issue(key.Public(), id, time.Hour)
	if err != nil {
		return status.Errorf(codes.Internal, "issue: %v", err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	if err := s.Send(&delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{{
		X509Svid:    &types.X509SVID{Id: &types.SPIFFEID{TrustDomain: testTD, Path: id.SPIFFEID().Path()}, CertChain: [][]byte{chain[0].Raw}, ExpiresAt: chain[0].NotAfter.Unix()},
		X509SvidKey: der,
	}}}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

func (f *fakeSPIRE) SubscribeToX509Bundles(_ *delegatedv1.SubscribeToX509BundlesRequest, s delegatedv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
	if err := s.Send(&delegatedv1.SubscribeToX509BundlesResponse{CaCertificates: map[string][]byte{"spiffe://" + testTD: f.ca.Bundle().X509Authorities()[0].Raw}}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// startFakeSPIRE serves a fakeSPIRE on a Unix socket and returns its path.
func startFakeSPIRE(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "wfake") // socket paths must stay short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	delegatedv1.RegisterDelegatedIdentityServer(srv, &fakeSPIRE{ca: newTestCA(t)})
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return sock
}

// fakeIstiod serves IstioCertificateService over TLS on loopback: it wants
// the bearer token, an ImpersonatedIdentity matching the CSR, and signs with
// a built-in CA, answering leaf then root as istiod does.
type fakeIstiod struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca    *builtinca.CA
	token string
	addr  string
	root  string // PEM file of the roots of its serving certificate
	dir   string
}

func (f *fakeIstiod) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+f.token {
		return nil, status.Error(codes.Unauthenticated, "authenticate: bad bearer token")
	}
	if got := md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
		return nil, status.Errorf(codes.InvalidArgument, "ClusterID %q", got)
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "no CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || len(csr.URIs) != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	id, err := identity.Parse(csr.URIs[0].String())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr SAN: %v", err)
	}
	if imp := req.GetMetadata().GetFields()["ImpersonatedIdentity"].GetStringValue(); imp != id.String() {
		return nil, status.Errorf(codes.PermissionDenied, "impersonated %q for a CSR of %s", imp, id)
	}
	chain, err := f.ca.Issue(csr.PublicKey, id, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sign: %v", err)
	}
	var out []string
	for _, c := range append(chain, f.ca.Bundle().X509Authorities()...) {
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	return &pb.IstioCertificateResponse{CertChain: out}, nil
}

// flags returns the istiod flags for this fake, with token in the token file.
func (f *fakeIstiod) flags(token string) []string {
	tokenFile := filepath.Join(f.dir, "token-"+token)
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		panic(err)
	}
	return []string{"--ca-provider=istiod", "--istiod-addr", f.addr, "--istiod-root-ca", f.root, "--istiod-token-file", tokenFile}
}

func startFakeIstiod(t *testing.T, token string) *fakeIstiod {
	t.Helper()
	dir := t.TempDir()
	// A serving certificate for 127.0.0.1 from a root written to a file.
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "istiod test root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "istiod"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}, root, key.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(dir, "root-cert.pem")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12,
	})))
	f := &fakeIstiod{ca: newTestCA(t), token: token, addr: ln.Addr().String(), root: rootFile, dir: dir}
	pb.RegisterIstioCertificateServiceServer(srv, f)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f
}
