package identity_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
)

var (
	testTD = spiffeid.RequireTrustDomainFromString("cluster.local")
	// start is the fake clock's epoch: real wall time, so nothing is surprising
	// when a certificate made on the fake clock meets the real one.
	start = time.Now().Truncate(time.Second)
)

func mustID(t testing.TB, ns, sa string) identity.Identity {
	t.Helper()
	id, err := identity.New(testTD.Name(), ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// newCA returns a built-in CA for testTD that reads the given clock.
func newCA(t testing.TB, now func() time.Time, ttl time.Duration) *builtinca.CA {
	t.Helper()
	return newCAFor(t, testTD, now, ttl)
}

// newOtherTDCA returns a built-in CA for another trust domain.
func newOtherTDCA(t testing.TB, td spiffeid.TrustDomain, now func() time.Time) *builtinca.CA {
	t.Helper()
	return newCAFor(t, td, now, 24*time.Hour)
}

func newCAFor(t testing.TB, td spiffeid.TrustDomain, now func() time.Time, ttl time.Duration) *builtinca.CA {
	t.Helper()
	opts := builtinca.Options{TrustDomain: td, TTL: ttl, Now: now}
	certPEM, keyPEM, err := builtinca.GenerateRoot(opts)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: certPEM, builtinca.KeyFile: keyPEM}, opts)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// scriptedProvider wraps a real provider, counting calls, optionally failing,
// blocking, or rewriting what comes back.
type scriptedProvider struct {
	next identity.Provider

	mu      sync.Mutex
	calls   map[identity.Identity]int
	err     error         // returned instead of fetching, when set
	gate    chan struct{} // when set, Fetch waits for it to close
	rewrite func(*x509svid.SVID, *x509bundle.Bundle) (*x509svid.SVID, *x509bundle.Bundle)
	started chan identity.Identity // when set, receives id at each call
}

func newScripted(next identity.Provider) *scriptedProvider {
	return &scriptedProvider{next: next, calls: make(map[identity.Identity]int)}
}

func (p *scriptedProvider) Fetch(ctx context.Context, id identity.Identity) (*x509svid.SVID, *x509bundle.Bundle, error) {
	p.mu.Lock()
	p.calls[id]++
	err, gate, rewrite, started := p.err, p.gate, p.rewrite, p.started
	p.mu.Unlock()
	if started != nil {
		started <- id
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, nil, err
	}
	svid, bundle, err := p.next.Fetch(ctx, id)
	if err == nil && rewrite != nil {
		svid, bundle = rewrite(svid, bundle)
	}
	return svid, bundle, err
}

func (p *scriptedProvider) setErr(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.err = err
}

func (p *scriptedProvider) count(id identity.Identity) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls[id]
}

// newManager returns a Manager on a fake clock, closed at the end of the test.
func newManager(t testing.TB, p identity.Provider, clk *fakeclock.Clock, mod ...func(*identity.Options)) *identity.Manager {
	t.Helper()
	opts := identity.Options{Provider: p, ProviderName: "test", Clock: clk, Logger: testLogger(t)}
	for _, f := range mod {
		f(&opts)
	}
	m, err := identity.NewManager(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// eventually polls cond for up to 10 s: fetches run on their own goroutines.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func certInfo(t testing.TB, m *identity.Manager, id identity.Identity) identity.CertInfo {
	t.Helper()
	for _, ci := range m.Certificates() {
		if ci.Identity == id {
			return ci
		}
	}
	t.Fatalf("%s not in Certificates()", id)
	return identity.CertInfo{}
}

// settled reports whether id has no fetch in flight (a next refresh is scheduled).
func settled(m *identity.Manager, id identity.Identity) bool {
	for _, ci := range m.Certificates() {
		if ci.Identity == id {
			return !ci.NextRefresh.IsZero()
		}
	}
	return false
}

// testLogger sends log lines to t.Log, shown only when the test fails or with -v.
func testLogger(t testing.TB) *slog.Logger {
	if _, bench := t.(*testing.B); bench {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}
