package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
)

func TestAcquireFetchesBeforeReturning(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")

	if err := m.Ready(); err != nil {
		t.Fatalf("Ready with nothing held: %v", err)
	}
	if err := m.Acquire(t.Context(), id); err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	svid, err := m.SVID(id)
	if err != nil {
		t.Fatalf("SVID right after Acquire: %v", err)
	}
	if svid.ID != id.SPIFFEID() {
		t.Fatalf("SVID for %s, want %s", svid.ID, id)
	}
	leaf := svid.Certificates[0]
	if got := leaf.NotAfter.Sub(start); got != 24*time.Hour {
		t.Errorf("leaf lifetime from now = %s, want 24h", got)
	}
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("leaf key %T, want ECDSA P-256", leaf.PublicKey)
	}
	if err := m.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	ci := certInfo(t, m, id)
	if ci.State != identity.StateValid || ci.Pods != 1 || ci.Provider != "test" || ci.Serial != fmt.Sprintf("%x", leaf.SerialNumber) {
		t.Fatalf("CertInfo = %+v", ci)
	}
	// A second pod of the same identity costs no fetch.
	if err := m.Acquire(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	if n := p.count(id); n != 1 {
		t.Fatalf("fetches = %d after two Acquires, want 1", n)
	}
	if ci := certInfo(t, m, id); ci.Pods != 2 {
		t.Fatalf("pods = %d, want 2", ci.Pods)
	}
}

func TestRenewAtHalfLife(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "first fetch settled", func() bool { return settled(m, id) })
	first := certInfo(t, m, id)
	// The leaf is backdated one minute: half-life is (24h+1m)/2 after NotBefore.
	wantRenew := first.NotBefore.Add(first.NotAfter.Sub(first.NotBefore) / 2)
	if !first.NextRefresh.Equal(wantRenew) {
		t.Fatalf("next refresh %s, want half-life %s", first.NextRefresh, wantRenew)
	}

	clk.Advance(wantRenew.Sub(clk.Now()) - time.Second)
	if n := p.count(id); n != 1 {
		t.Fatalf("fetched %d times before half-life, want 1", n)
	}
	clk.Advance(time.Second)
	eventually(t, "renewal", func() bool { return p.count(id) == 2 && settled(m, id) })
	second := certInfo(t, m, id)
	if second.Serial == first.Serial {
		t.Fatal("serial unchanged after renewal")
	}
	if second.State != identity.StateValid || second.LastError != "" {
		t.Fatalf("after renewal: %+v", second)
	}
	if want := clk.Now().Add(12*time.Hour - 30*time.Second); !second.NextRefresh.Equal(want) {
		t.Fatalf("next refresh %s, want %s", second.NextRefresh, want)
	}
}

func TestBackoff(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	p.setErr(errors.New("dial tcp 127.0.0.1:15012: connect: connection refused"))
	reg := prometheus.NewRegistry()
	m := newManager(t, p, clk, func(o *identity.Options) { o.Registry = reg })
	id := mustID(t, "default", "web")

	err := m.Acquire(t.Context(), id)
	if err == nil || !strings.Contains(err.Error(), "(provider test): dial tcp 127.0.0.1:15012: connect: connection refused") {
		t.Fatalf("Acquire with CA down = %v, want the fetch error and the provider's name", err)
	}
	want := []time.Duration{
		500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second,
		16 * time.Second, 32 * time.Second, 64 * time.Second, 128 * time.Second, 150 * time.Second, 150 * time.Second,
	}
	for i, d := range want {
		eventually(t, "failure settled", func() bool { return p.count(id) == i+1 && settled(m, id) })
		ci := certInfo(t, m, id)
		if got := ci.NextRefresh.Sub(clk.Now()); got != d {
			t.Fatalf("after failure %d: retry in %s, want %s", i+1, got, d)
		}
		if ci.State != identity.StateUnavailable {
			t.Fatalf("state %q, want %q", ci.State, identity.StateUnavailable)
		}
		rerr := m.Ready()
		wantMsg := fmt.Sprintf("fetch %s (provider test): dial tcp 127.0.0.1:15012: connect: connection refused: retrying in %s", id, d)
		if rerr == nil || rerr.Error() != wantMsg {
			t.Fatalf("Ready() = %v, want %q", rerr, wantMsg)
		}
		if got := fetchErrors(t, reg); got != float64(i+1) {
			t.Fatalf("fetch errors metric = %v, want %d", got, i+1)
		}
		clk.Advance(d)
	}
	// The CA comes back: the retry succeeds and the back-off resets.
	eventually(t, "failure settled", func() bool { return settled(m, id) })
	p.setErr(nil)
	clk.Advance(150 * time.Second)
	eventually(t, "recovery", func() bool { return certInfo(t, m, id).State == identity.StateValid })
	if err := m.Ready(); err != nil {
		t.Fatalf("Ready after recovery: %v", err)
	}
}

// fetchErrors reads warren_identity_fetch_errors_total from reg.
func fetchErrors(t testing.TB, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "warren_identity_fetch_errors_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

func TestConcurrentAcquiresShareOneFetch(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	gate := make(chan struct{})
	p.gate = gate
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	other := mustID(t, "default", "db")

	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for range n {
		wg.Add(2)
		go func() { defer wg.Done(); errs <- m.Acquire(t.Context(), id) }()
		go func() { defer wg.Done(); errs <- m.Acquire(t.Context(), other) }()
	}
	eventually(t, "all callers waiting", func() bool {
		ci := m.Certificates()
		return len(ci) == 2 && ci[0].Pods == n && ci[1].Pods == n
	})
	if err := m.Ready(); err == nil || !strings.Contains(err.Error(), "first fetch in progress") {
		t.Fatalf("Ready while fetching = %v", err)
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if p.count(id) != 1 || p.count(other) != 1 {
		t.Fatalf("fetches: %s %d, %s %d; want 1 each", id, p.count(id), other, p.count(other))
	}
}

func TestHandshakeWaitsForFirstFetch(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	gate := make(chan struct{})
	p.gate = gate
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	ctx, cancel := context.WithCancel(t.Context())
	acquired := make(chan error, 1)
	go func() { acquired <- m.Acquire(ctx, id) }()
	eventually(t, "pod counted", func() bool { return len(m.Certificates()) == 1 })
	// Acquire gives up with its context; the pod stays counted.
	cancel()
	if err := <-acquired; !errors.Is(err, context.Canceled) {
		t.Fatalf("Acquire after cancel = %v", err)
	}
	cfg, err := m.ClientConfig(id.SPIFFEID(), []spiffeid.ID{id.SPIFFEID()})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("certificate returned before the fetch finished: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	if err := <-got; err != nil {
		t.Fatalf("certificate after fetch: %v", err)
	}
}

func TestReleaseDropsIdentity(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	for range 2 {
		if err := m.Acquire(t.Context(), id); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "settled", func() bool { return settled(m, id) })
	m.Release(id)
	if _, err := m.SVID(id); err != nil {
		t.Fatalf("SVID after the first of two pods left: %v", err)
	}
	m.Release(id)
	if _, err := m.SVID(id); err == nil || !strings.Contains(err.Error(), "not held") {
		t.Fatalf("SVID after the last pod left = %v", err)
	}
	if len(m.Certificates()) != 0 {
		t.Fatalf("Certificates() = %+v after release", m.Certificates())
	}
	if pend := clk.Pending(); len(pend) != 0 {
		t.Fatalf("timers still pending after release: %v", pend)
	}
	clk.Advance(48 * time.Hour)
	if n := p.count(id); n != 1 {
		t.Fatalf("fetched %d times, want 1: no renewal after release", n)
	}
	if _, err := m.ClientConfig(id.SPIFFEID(), []spiffeid.ID{id.SPIFFEID()}); err == nil {
		t.Fatal("ClientConfig for a released identity succeeded")
	}
	m.Release(id) // extra release: logged, harmless
}

func TestReleaseDuringFetchDiscardsResult(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	p.gate = make(chan struct{})
	started := make(chan identity.Identity, 1)
	p.started = started
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	acquired := make(chan error, 1)
	go func() { acquired <- m.Acquire(t.Context(), id) }()
	<-started
	m.Release(id)
	if err := <-acquired; err == nil || !strings.Contains(err.Error(), "released") {
		t.Fatalf("Acquire when released meanwhile = %v", err)
	}
	if len(m.Certificates()) != 0 {
		t.Fatal("released identity still listed")
	}
}

// A CA that has not rotated yet hands back the certificate we hold; the
// Manager must back off instead of asking again at once.
func TestStaleCertificateBacksOff(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	var mu sync.Mutex
	var first *x509svid.SVID
	var firstBundle *x509bundle.Bundle
	p.rewrite = func(s *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first, firstBundle = s, b
		}
		return first, firstBundle
	}
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "settled", func() bool { return settled(m, id) })
	// Advance exactly to each timer, so the fetch it starts reads that time.
	clk.Advance(certInfo(t, m, id).NextRefresh.Sub(clk.Now()))
	for i, d := range []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second} {
		eventually(t, "stale fetch settled", func() bool { return p.count(id) == i+2 && settled(m, id) })
		ci := certInfo(t, m, id)
		if got := ci.NextRefresh.Sub(clk.Now()); got != d {
			t.Fatalf("stale fetch %d: retry in %s, want %s", i+1, got, d)
		}
		if ci.State != identity.StateRenewing || !strings.Contains(ci.LastError, "already past its half-life") {
			t.Fatalf("stale fetch %d: %+v", i+1, ci)
		}
		if err := m.Ready(); err != nil {
			t.Fatalf("Ready with a valid old certificate: %v", err)
		}
		clk.Advance(d)
	}
}

// Each bad answer from a CA is refused with an error that says what is wrong.
func TestRefusesBadCertificates(t *testing.T) {
	clk := fakeclock.New(start)
	ca := newCA(t, clk.Now, 24*time.Hour)
	otherCA := newCA(t, clk.Now, 24*time.Hour)
	id := mustID(t, "default", "web")
	otherID := mustID(t, "default", "db")
	expiredCA := newCA(t, func() time.Time { return start.Add(-48 * time.Hour) }, 24*time.Hour)
	foreignTD := spiffeid.RequireTrustDomainFromString("evil.example")

	tests := []struct {
		name    string
		rewrite func(*x509svid.SVID, *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle)
		want    string
	}{
		{"leaf SAN differs from requested", func(_ *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			s, _, err := ca.Fetch(context.Background(), otherID)
			if err != nil {
				t.Fatal(err)
			}
			return s, b
		}, "leaf certificate is for spiffe://cluster.local/ns/default/sa/db, requested spiffe://cluster.local/ns/default/sa/web"},
		{"bundle of another trust domain", func(s *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			return s, x509bundle.FromX509Authorities(foreignTD, b.X509Authorities())
		}, "trust bundle is for trust domain evil.example, want cluster.local"},
		{"leaf of another trust domain", func(_ *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			foreign := identity.Identity{TrustDomain: foreignTD, Namespace: "default", ServiceAccount: "web"}
			s, _, err := newOtherTDCA(t, foreignTD, clk.Now).Fetch(context.Background(), foreign)
			if err != nil {
				t.Fatal(err)
			}
			return s, b
		}, "leaf certificate is for spiffe://evil.example/ns/default/sa/web, requested spiffe://cluster.local/ns/default/sa/web"},
		{"chain from an untrusted CA", func(_ *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			s, _, err := otherCA.Fetch(context.Background(), id)
			if err != nil {
				t.Fatal(err)
			}
			return s, b
		}, "verify chain against the trust bundle of cluster.local"},
		{"expired leaf", func(_ *x509svid.SVID, _ *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			s, b, err := expiredCA.Fetch(context.Background(), id)
			if err != nil {
				t.Fatal(err)
			}
			return s, b
		}, "not at"},
		{"CA expired, leaf not", func(_ *x509svid.SVID, _ *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			return expiredRootLeaf(t, id)
		}, "verify chain against the trust bundle of cluster.local: x509svid: could not verify leaf certificate: x509: certificate has expired or is not yet valid"},
		{"empty chain", func(s *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			return &x509svid.SVID{ID: s.ID, PrivateKey: s.PrivateKey}, b
		}, "no certificate in response"},
		{"no bundle", func(s *x509svid.SVID, _ *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			return s, nil
		}, "no trust bundle"},
		{"key does not match leaf", func(s *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			return &x509svid.SVID{ID: s.ID, Certificates: s.Certificates, PrivateKey: k}, b
		}, "private key does not match the leaf certificate"},
		{"RSA leaf", func(_ *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			k, _ := rsa.GenerateKey(rand.Reader, 2048)
			chain, err := ca.Issue(k.Public(), id, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			return &x509svid.SVID{ID: id.SPIFFEID(), Certificates: chain, PrivateKey: k}, b
		}, "leaf key is RSA, want ECDSA P-256"},
		{"CA certificate as leaf", func(s *x509svid.SVID, b *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle) {
			return &x509svid.SVID{ID: s.ID, Certificates: []*x509.Certificate{b.X509Authorities()[0]}, PrivateKey: s.PrivateKey}, b
		}, "leaf certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newScripted(ca)
			p.rewrite = tt.rewrite
			reg := prometheus.NewRegistry()
			m := newManager(t, p, clk, func(o *identity.Options) { o.Registry = reg })
			err := m.Acquire(t.Context(), id)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "test returned an unusable certificate") {
				t.Fatalf("Acquire = %v\nwant an error containing %q", err, tt.want)
			}
			if _, err := m.SVID(id); err == nil {
				t.Fatal("a refused certificate is in use")
			}
			if err := m.Ready(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Ready() = %v", err)
			}
			if got := fetchErrors(t, reg); got != 1 {
				t.Fatalf("fetch errors = %v, want 1", got)
			}
		})
	}
}

func TestExpiredCertificateIsNotServed(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, time.Hour))
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "settled", func() bool { return settled(m, id) })
	p.setErr(errors.New("CA down"))
	// Renewals fail from half-life on; the old certificate serves until it expires.
	for clk.Now().Before(start.Add(time.Hour)) {
		clk.Advance(10 * time.Second)
		eventually(t, "settled", func() bool { return settled(m, id) })
		if clk.Now().Before(start.Add(time.Hour)) {
			if _, err := m.SVID(id); err != nil {
				t.Fatalf("at %s: old certificate not served: %v", clk.Now().Sub(start), err)
			}
		}
	}
	_, err := m.SVID(id)
	if err == nil || !strings.Contains(err.Error(), "certificate expired at") || !strings.Contains(err.Error(), "CA down") {
		t.Fatalf("SVID after expiry = %v", err)
	}
	if ci := certInfo(t, m, id); ci.State != identity.StateUnavailable {
		t.Fatalf("state %q after expiry", ci.State)
	}
}

func TestMetricsAndInspect(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, 24*time.Hour))
	reg := prometheus.NewRegistry()
	m := newManager(t, p, clk, func(o *identity.Options) { o.Registry = reg; o.ProviderName = "builtin" })
	web, db := mustID(t, "default", "web"), mustID(t, "prod", "db")
	for _, id := range []identity.Identity{web, db} {
		if err := m.Acquire(t.Context(), id); err != nil {
			t.Fatal(err)
		}
	}
	clk.Advance(time.Hour)
	want := fmt.Sprintf(`
# HELP warren_identity_certificate_expiry_seconds Seconds until the workload certificate of an identity expires (negative once expired).
# TYPE warren_identity_certificate_expiry_seconds gauge
warren_identity_certificate_expiry_seconds{identity="%s",provider="builtin"} 82800
warren_identity_certificate_expiry_seconds{identity="%s",provider="builtin"} 82800
# HELP warren_identity_certificates Workload certificates held and currently valid.
# TYPE warren_identity_certificates gauge
warren_identity_certificates{provider="builtin"} 2
`, web, db)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"warren_identity_certificates", "warren_identity_certificate_expiry_seconds"); err != nil {
		t.Fatal(err)
	}
	// A second Manager with another provider shares the registry.
	if _, err := identity.NewManager(identity.Options{Provider: p, ProviderName: "spire", Registry: reg, Clock: clk}); err != nil {
		t.Fatalf("second manager on one registry: %v", err)
	}

	b, err := json.Marshal(m.Certificates())
	if err != nil {
		t.Fatal(err)
	}
	var back []map[string]any
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if len(back) != 2 || back[0]["identity"] != web.String() || back[0]["state"] != "valid" || back[0]["provider"] != "builtin" ||
		back[0]["serial"] == "" || back[0]["notAfter"] == nil || back[0]["lastError"] != nil {
		t.Fatalf("inspect JSON: %s", b)
	}
}

func TestCloseWakesWaiters(t *testing.T) {
	clk := fakeclock.New(start)
	p := newScripted(newCA(t, clk.Now, time.Hour))
	p.setErr(errors.New("CA down"))
	m := newManager(t, p, clk)
	id := mustID(t, "default", "web")
	if err := m.Acquire(t.Context(), id); err == nil {
		t.Fatal("Acquire with the CA down succeeded")
	}
	eventually(t, "settled", func() bool { return settled(m, id) })
	// A second pod waits for the next attempt, which Close cancels.
	got := make(chan error, 1)
	go func() { got <- m.Acquire(t.Context(), id) }()
	eventually(t, "second pod counted", func() bool { return certInfo(t, m, id).Pods == 2 })
	m.Close()
	select {
	case err := <-got:
		if err == nil || !strings.Contains(err.Error(), "closed") {
			t.Fatalf("Acquire woken by Close = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close left Acquire waiting")
	}
}

func TestAcquireRejectsInvalid(t *testing.T) {
	clk := fakeclock.New(start)
	m := newManager(t, newScripted(newCA(t, clk.Now, time.Hour)), clk)
	if err := m.Acquire(t.Context(), identity.Identity{}); err == nil {
		t.Fatal("zero identity acquired")
	}
	if len(m.Certificates()) != 0 {
		t.Fatal("invalid identity counted")
	}
	m.Close()
	if err := m.Acquire(t.Context(), mustID(t, "a", "b")); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("Acquire after Close = %v", err)
	}
	if _, err := identity.NewManager(identity.Options{}); err == nil {
		t.Fatal("manager without provider")
	}
}

// expiredRootLeaf returns a currently valid leaf for id signed by a root that
// expired an hour ago, and that root as the bundle: a CA that kept signing
// past its own expiry.
func expiredRootLeaf(t *testing.T, id identity.Identity) (*x509svid.SVID, *x509bundle.Bundle) {
	t.Helper()
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "expired root"},
		NotBefore: start.Add(-48 * time.Hour), NotAfter: start.Add(-time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), URIs: []*url.URL{id.SPIFFEID().URL()},
		NotBefore: start.Add(-time.Minute), NotAfter: start.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
	}, root, leafKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	return &x509svid.SVID{ID: id.SPIFFEID(), Certificates: []*x509.Certificate{leaf}, PrivateKey: leafKey},
		x509bundle.FromX509Authorities(id.TrustDomain, []*x509.Certificate{root})
}
