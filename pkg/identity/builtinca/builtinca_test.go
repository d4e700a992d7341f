package builtinca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func mustID(t *testing.T, ns, sa string) identity.Identity {
	t.Helper()
	id, err := identity.New(td.Name(), ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestLoadDirGeneratesOnce(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	opts := builtinca.Options{TrustDomain: td}
	if _, err := builtinca.LoadDir(dir, false, opts); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("LoadDir of an empty directory without generate = %v", err)
	}
	ca, err := builtinca.LoadDir(dir, true, opts)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{"": 0o700, builtinca.KeyFile: 0o600, builtinca.CertFile: 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s mode %o, want %o", filepath.Join(dir, name), got, want)
		}
	}
	again, err := builtinca.LoadDir(dir, true, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Bundle().Equal(ca.Bundle()) {
		t.Fatal("second LoadDir generated a new root")
	}
	root := ca.Bundle().X509Authorities()[0]
	if !root.IsCA || len(root.URIs) != 1 || root.URIs[0].String() != "spiffe://cluster.local" {
		t.Fatalf("root: IsCA %v URIs %v", root.IsCA, root.URIs)
	}
}

func TestLoadDirConcurrentInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	const n = 8
	cas := make([]*builtinca.CA, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { cas[i], errs[i] = builtinca.LoadDir(dir, true, builtinca.Options{TrustDomain: td}) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if !cas[i].Bundle().Equal(cas[0].Bundle()) {
			t.Fatal("concurrent initialisations produced different roots")
		}
	}
}

func TestFetchIssuesWorkloadSVID(t *testing.T) {
	now := time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	certPEM, keyPEM, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: td, Now: func() time.Time { return now.Add(-time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	web := mustID(t, "default", "web")
	onNode := map[identity.Identity]bool{web: true}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: certPEM, builtinca.KeyFile: keyPEM}, builtinca.Options{TrustDomain: td, Now: func() time.Time { return now }, NodeHas: func(id identity.Identity) bool { return onNode[id] }})
	if err != nil {
		t.Fatal(err)
	}
	svid, bundle, err := ca.Fetch(t.Context(), web)
	if err != nil {
		t.Fatal(err)
	}
	if err := identity.CheckSVID(web, svid, bundle, now); err != nil {
		t.Fatalf("issued SVID fails the manager's checks: %v", err)
	}
	leaf := svid.Certificates[0]
	if leaf.NotAfter != now.Add(24*time.Hour) || leaf.NotBefore != now.Add(-time.Minute) {
		t.Errorf("validity %s – %s", leaf.NotBefore, leaf.NotAfter)
	}
	if len(svid.Certificates) != 1 {
		t.Errorf("chain of %d certificates from a root CA, want the leaf alone", len(svid.Certificates))
	}
	if leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign != 0 || len(leaf.ExtKeyUsage) != 2 {
		t.Errorf("leaf usage: IsCA %v KeyUsage %b ExtKeyUsage %v", leaf.IsCA, leaf.KeyUsage, leaf.ExtKeyUsage)
	}
	// Two fetches, two keys, two serials.
	svid2, _, err := ca.Fetch(t.Context(), web)
	if err != nil {
		t.Fatal(err)
	}
	if svid2.Certificates[0].SerialNumber.Cmp(leaf.SerialNumber) == 0 || svid2.PrivateKey.(*ecdsa.PrivateKey).Equal(svid.PrivateKey) {
		t.Fatal("second fetch reused serial or key")
	}

	_, _, err = ca.Fetch(t.Context(), mustID(t, "default", "elsewhere"))
	if err == nil || !strings.Contains(err.Error(), "refused: no pod on this node has this identity") {
		t.Fatalf("identity of no local pod: %v", err)
	}
	other := identity.Identity{TrustDomain: spiffeid.RequireTrustDomainFromString("other.example"), Namespace: "default", ServiceAccount: "web"}
	onNode[other] = true
	_, _, err = ca.Fetch(t.Context(), other)
	if err == nil || !strings.Contains(err.Error(), "refused: the CA issues only for trust domain cluster.local") {
		t.Fatalf("identity of another trust domain: %v", err)
	}
}

// An intermediate CA in Istio's plug-in layout: the chain goes out with each
// leaf, the bundle holds only the root.
func TestIntermediateCA(t *testing.T) {
	now := time.Now()
	rootCert, rootKey := selfSigned(t, "root", now.Add(-time.Hour), now.Add(time.Hour*24*365))
	interKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	inter := sign(t, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * 30 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{td.ID().URL()},
	}, rootCert, interKey, rootKey)

	data := map[string][]byte{
		builtinca.CertFile:  pemCert(inter),
		builtinca.KeyFile:   pemKey(t, interKey),
		builtinca.RootFile:  pemCert(rootCert),
		builtinca.ChainFile: append(pemCert(inter), pemCert(rootCert)...),
	}
	ca, err := builtinca.New(data, builtinca.Options{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	web := mustID(t, "default", "web")
	svid, bundle, err := ca.Fetch(t.Context(), web)
	if err != nil {
		t.Fatal(err)
	}
	if len(svid.Certificates) != 2 || !svid.Certificates[1].Equal(inter) {
		t.Fatalf("chain of %d, want leaf + intermediate", len(svid.Certificates))
	}
	if roots := bundle.X509Authorities(); len(roots) != 1 || !roots[0].Equal(rootCert) {
		t.Fatalf("bundle %d roots, want the root only", len(roots))
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Fatalf("verify: %v", err)
	}

	delete(data, builtinca.RootFile)
	if _, err := builtinca.New(data, builtinca.Options{TrustDomain: td}); err == nil || !strings.Contains(err.Error(), "not self-signed and there is no root-cert.pem") {
		t.Fatalf("intermediate without root: %v", err)
	}
}

func TestRefusesBadCA(t *testing.T) {
	now := time.Now()
	good, goodKey, _ := builtinca.GenerateRoot(builtinca.Options{TrustDomain: td})
	expired, expiredKey := selfSigned(t, "expired", now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	notYet, notYetKey := selfSigned(t, "future", now.Add(time.Hour), now.Add(48*time.Hour))
	otherTD, otherKey, _ := builtinca.GenerateRoot(builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("other.example")})
	_, strayKey, _ := builtinca.GenerateRoot(builtinca.Options{TrustDomain: td})
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := sign(t, &x509.Certificate{SerialNumber: big.NewInt(9), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		BasicConstraintsValid: true}, nil, leafKey, leafKey)

	tests := []struct {
		name string
		data map[string][]byte
		want string
	}{
		{"expired CA", map[string][]byte{builtinca.CertFile: pemCert(expired), builtinca.KeyFile: pemKey(t, expiredKey)}, "expired at"},
		{"CA not yet valid", map[string][]byte{builtinca.CertFile: pemCert(notYet), builtinca.KeyFile: pemKey(t, notYetKey)}, "not valid before"},
		{"CA of another trust domain", map[string][]byte{builtinca.CertFile: otherTD, builtinca.KeyFile: otherKey}, "is for trust domain other.example, configured trust domain is cluster.local"},
		{"key of another CA", map[string][]byte{builtinca.CertFile: good, builtinca.KeyFile: strayKey}, "ca-key.pem does not match the key of ca-cert.pem"},
		{"not a CA", map[string][]byte{builtinca.CertFile: pemCert(leaf), builtinca.KeyFile: pemKey(t, leafKey)}, "not a CA certificate"},
		{"no certificate", map[string][]byte{builtinca.CertFile: []byte("junk"), builtinca.KeyFile: goodKey}, "ca-cert.pem: no certificate"},
		{"no key", map[string][]byte{builtinca.CertFile: good}, "ca-key.pem: no private key"},
		{"garbled certificate", map[string][]byte{builtinca.CertFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("xx")}), builtinca.KeyFile: goodKey}, "ca-cert.pem:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := builtinca.New(tt.data, builtinca.Options{TrustDomain: td})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

// A CA that expires while running stops issuing, and says why.
func TestCAExpiresWhileRunning(t *testing.T) {
	now := time.Now()
	clock := now
	cert, key := selfSigned(t, "short", now.Add(-time.Hour), now.Add(time.Hour))
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: pemCert(cert), builtinca.KeyFile: pemKey(t, key)},
		builtinca.Options{TrustDomain: td, Now: func() time.Time { return clock }})
	if err != nil {
		t.Fatal(err)
	}
	svid, _, err := ca.Fetch(t.Context(), mustID(t, "a", "b"))
	if err != nil {
		t.Fatal(err)
	}
	if !svid.Certificates[0].NotAfter.Equal(cert.NotAfter) {
		t.Fatalf("leaf outlives its CA: %s > %s", svid.Certificates[0].NotAfter, cert.NotAfter)
	}
	clock = now.Add(2 * time.Hour)
	if _, _, err := ca.Fetch(t.Context(), mustID(t, "a", "b")); err == nil || !strings.Contains(err.Error(), "expired at") {
		t.Fatalf("fetch from an expired CA = %v", err)
	}
}

func selfSigned(t *testing.T, cn string, notBefore, notAfter time.Time) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c := sign(t, &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, NotBefore: notBefore, NotAfter: notAfter,
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, nil, key, key)
	return c, key
}

// sign signs tmpl for pub's key with parent (self-signed when nil) and signer.
func sign(t *testing.T, tmpl, parent *x509.Certificate, subjectKey *ecdsa.PrivateKey, signer *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, subjectKey.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func pemKey(t *testing.T, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

// The Manager renews built-in certificates at half-life without a restart:
// after the clock passes it, a new certificate (new serial, later expiry) is
// in use, the old one was never dropped, and the inspect view names the
// provider.
func TestManagerRotatesBuiltinCertificates(t *testing.T) {
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	ca, err := builtinca.LoadDir(filepath.Join(t.TempDir(), "ca"), true, builtinca.Options{TrustDomain: td, TTL: time.Hour, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	m, err := identity.NewManager(identity.Options{Provider: ca, ProviderName: "builtin", Clock: clk, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	web := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	first := waitCert(t, m, func(ci identity.CertInfo) bool { return ci.State == identity.StateValid && !ci.NextRefresh.IsZero() })
	if first.Provider != "builtin" {
		t.Fatalf("inspect view names provider %q, want builtin", first.Provider)
	}
	for i := range 3 {
		clk.Advance(first.NextRefresh.Sub(clk.Now()) + time.Second)
		next := waitCert(t, m, func(ci identity.CertInfo) bool {
			return ci.Serial != first.Serial && ci.State == identity.StateValid && !ci.NextRefresh.IsZero()
		})
		if !next.NotAfter.After(first.NotAfter) {
			t.Fatalf("rotation %d: new certificate expires %s, not after the old one's %s", i+1, next.NotAfter, first.NotAfter)
		}
		if err := m.Ready(); err != nil {
			t.Fatalf("rotation %d: Ready = %v", i+1, err)
		}
		first = next
	}
}

// waitCert polls the Manager's only certificate until ok accepts it.
func waitCert(t *testing.T, m *identity.Manager, ok func(identity.CertInfo) bool) identity.CertInfo {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if cis := m.Certificates(); len(cis) == 1 && ok(cis[0]) {
			return cis[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("certificate never settled: %+v", m.Certificates())
		}
		time.Sleep(2 * time.Millisecond)
	}
}
