package spire_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
	"github.com/warren-mesh/warren/pkg/identity/spire"
)

// fakeAgent serves the real Delegated Identity API proto with scripted
// answers. Each subscription gets its own channel, handed to the test.
type fakeAgent struct {
	delegatedv1.UnimplementedDelegatedIdentityServer
	svidSubs   chan svidSub
	bundleSubs chan chan *delegatedv1.SubscribeToX509BundlesResponse
}

type svidSub struct {
	selectors []*types.Selector
	send      chan *delegatedv1.SubscribeToX509SVIDsResponse
}

func (f *fakeAgent) SubscribeToX509SVIDs(req *delegatedv1.SubscribeToX509SVIDsRequest, s delegatedv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	ch := make(chan *delegatedv1.SubscribeToX509SVIDsResponse, 4)
	f.svidSubs <- svidSub{req.GetSelectors(), ch}
	for {
		select {
		case r := <-ch:
			if err := s.Send(r); err != nil {
				return err
			}
		case <-s.Context().Done():
			return nil
		}
	}
}

func (f *fakeAgent) SubscribeToX509Bundles(_ *delegatedv1.SubscribeToX509BundlesRequest, s delegatedv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
	ch := make(chan *delegatedv1.SubscribeToX509BundlesResponse, 4)
	f.bundleSubs <- ch
	for {
		select {
		case r := <-ch:
			if err := s.Send(r); err != nil {
				return err
			}
		case <-s.Context().Done():
			return nil
		}
	}
}

func startFakeAgent(t *testing.T) (*fakeAgent, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "wfake")
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
	f := &fakeAgent{
		svidSubs:   make(chan svidSub, 4),
		bundleSubs: make(chan chan *delegatedv1.SubscribeToX509BundlesResponse, 4),
	}
	delegatedv1.RegisterDelegatedIdentityServer(srv, f)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f, sock
}

type fetchResult struct {
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
	err    error
}

// fetch runs p.Fetch while the fake agent answers its SVID subscription
// with msgs, and a bundle subscription, if one comes, with bundle.
func fetch(t *testing.T, ctx context.Context, f *fakeAgent, p *spire.Provider, id identity.Identity,
	bundle *delegatedv1.SubscribeToX509BundlesResponse, msgs ...*delegatedv1.SubscribeToX509SVIDsResponse) (fetchResult, []*types.Selector) {
	t.Helper()
	res := make(chan fetchResult, 1)
	go func() {
		s, b, err := p.Fetch(ctx, id)
		res <- fetchResult{s, b, err}
	}()
	var sub svidSub
	select {
	case sub = <-f.svidSubs:
	case r := <-res:
		return r, nil
	}
	for _, m := range msgs {
		sub.send <- m
	}
	for {
		select {
		case r := <-res:
			return r, sub.selectors
		case ch := <-f.bundleSubs:
			ch <- bundle
		}
	}
}

func newTestCA(t *testing.T) *builtinca.CA {
	t.Helper()
	opts := builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString(trustDomain)}
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

func svidMsg(t *testing.T, ca *builtinca.CA, id identity.Identity) *delegatedv1.X509SVIDWithKey {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := ca.Issue(key.Public(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	msg := &delegatedv1.X509SVIDWithKey{
		X509Svid:    &types.X509SVID{Id: &types.SPIFFEID{TrustDomain: id.TrustDomain.Name(), Path: id.SPIFFEID().Path()}, ExpiresAt: chain[0].NotAfter.Unix()},
		X509SvidKey: der,
	}
	for _, c := range chain {
		msg.X509Svid.CertChain = append(msg.X509Svid.CertChain, c.Raw)
	}
	return msg
}

func bundleMsg(cas ...*builtinca.CA) *delegatedv1.SubscribeToX509BundlesResponse {
	var der []byte
	for _, ca := range cas {
		for _, c := range ca.Bundle().X509Authorities() {
			der = append(der, c.Raw...)
		}
	}
	return &delegatedv1.SubscribeToX509BundlesResponse{CaCertificates: map[string][]byte{"spiffe://" + trustDomain: der}}
}

func TestFakeAgent(t *testing.T) {
	f, sock := startFakeAgent(t)
	ca := newTestCA(t)
	p, err := spire.New(spire.Options{AdminSocket: sock, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	web, _ := identity.New(trustDomain, "default", "web")
	db, _ := identity.New(trustDomain, "prod", "db")

	t.Run("fetch picks the requested identity", func(t *testing.T) {
		r, sel := fetch(t, t.Context(), f, p, web, bundleMsg(ca),
			&delegatedv1.SubscribeToX509SVIDsResponse{}, // nothing yet
			&delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{svidMsg(t, ca, db), svidMsg(t, ca, web)}})
		if r.err != nil {
			t.Fatal(r.err)
		}
		if err := identity.CheckSVID(web, r.svid, r.bundle, time.Now()); err != nil {
			t.Fatal(err)
		}
		if len(sel) != 2 || sel[0].GetType() != "k8s" || sel[0].GetValue() != "ns:default" || sel[1].GetValue() != "sa:web" {
			t.Fatalf("selectors %v", sel)
		}
	})

	t.Run("malformed key", func(t *testing.T) {
		m := svidMsg(t, ca, web)
		m.X509SvidKey = []byte("not a key")
		r, _ := fetch(t, t.Context(), f, p, web, nil, &delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{m}})
		if r.err == nil || !strings.Contains(r.err.Error(), "parse SVID from agent") {
			t.Fatalf("Fetch = %v", r.err)
		}
	})

	t.Run("malformed chain", func(t *testing.T) {
		m := svidMsg(t, ca, web)
		m.X509Svid.CertChain = [][]byte{{0x30, 0x01}}
		r, _ := fetch(t, t.Context(), f, p, web, nil, &delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{m}})
		if r.err == nil || !strings.Contains(r.err.Error(), "parse SVID from agent") {
			t.Fatalf("Fetch = %v", r.err)
		}
	})

	t.Run("only other identities", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		r, _ := fetch(t, ctx, f, p, web, nil, &delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{svidMsg(t, ca, db)}})
		if r.err == nil || !strings.Contains(r.err.Error(), "last update had [spiffe://cluster.local/ns/prod/sa/db]") {
			t.Fatalf("Fetch = %v", r.err)
		}
	})

	t.Run("bundle updates", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- p.Run(ctx) }()
		defer func() { cancel(); <-done }()
		td := spiffeid.RequireTrustDomainFromString(trustDomain)
		ca2 := newTestCA(t)
		sub := <-f.bundleSubs
		sub <- bundleMsg(ca, ca2)
		waitBundle(t, p, td, 2)
		sub <- bundleMsg(ca2)
		waitBundle(t, p, td, 1)
		b, _ := p.GetX509BundleForTrustDomain(td)
		if !b.HasX509Authority(ca2.Bundle().X509Authorities()[0]) {
			t.Fatal("bundle lost the new root")
		}
		// A garbled update is ignored; the last good bundle stays.
		sub <- &delegatedv1.SubscribeToX509BundlesResponse{CaCertificates: map[string][]byte{"spiffe://" + trustDomain: {1, 2, 3}}}
		time.Sleep(100 * time.Millisecond)
		waitBundle(t, p, td, 1)
	})
}

func waitBundle(t *testing.T, p *spire.Provider, td spiffeid.TrustDomain, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := p.GetX509BundleForTrustDomain(td)
		if err == nil && len(b.X509Authorities()) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("bundle for %s: %v, %v; want %d roots", td, b, err, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestAgentUnreachable(t *testing.T) {
	p, err := spire.New(spire.Options{AdminSocket: "/nonexistent/warren-admin.sock", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	web, _ := identity.New(trustDomain, "default", "web")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, _, err = p.Fetch(ctx, web)
	if err == nil || !strings.Contains(err.Error(), "SPIRE agent unreachable at /nonexistent/warren-admin.sock") {
		t.Fatalf("Fetch = %v", err)
	}
	if _, err := spire.New(spire.Options{}); err == nil {
		t.Fatal("New without a socket")
	}
}

// The Manager renews SPIRE certificates at half-life without a restart: each
// renewal subscribes again with the identity's selectors and installs the
// SVID the agent hands out then, while the bundle fetched with the first one
// stays in use.
func TestManagerRotatesSPIRECertificates(t *testing.T) {
	f, sock := startFakeAgent(t)
	clk := fakeclock.New(time.Now().Truncate(time.Second))
	opts := builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString(trustDomain), Now: clk.Now}
	c, k, err := builtinca.GenerateRoot(opts)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: c, builtinca.KeyFile: k}, opts)
	if err != nil {
		t.Fatal(err)
	}
	web, _ := identity.New(trustDomain, "default", "web")

	// The fake agent answers every subscription with an SVID issued now (on
	// the fake clock), for an hour.
	var subs atomic.Int32
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() {
		for {
			select {
			case sub := <-f.svidSubs:
				subs.Add(1)
				key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				chain, err := ca.Issue(key.Public(), web, time.Hour)
				if err != nil {
					t.Error(err)
					return
				}
				der, _ := x509.MarshalPKCS8PrivateKey(key)
				sub.send <- &delegatedv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedv1.X509SVIDWithKey{{
					X509Svid:    &types.X509SVID{Id: &types.SPIFFEID{TrustDomain: trustDomain, Path: web.SPIFFEID().Path()}, CertChain: [][]byte{chain[0].Raw}, ExpiresAt: chain[0].NotAfter.Unix()},
					X509SvidKey: der,
				}}}
			case ch := <-f.bundleSubs:
				ch <- bundleMsg(ca)
			case <-ctx.Done():
				return
			}
		}
	}()

	p, err := spire.New(spire.Options{AdminSocket: sock, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	m, err := identity.NewManager(identity.Options{Provider: p, ProviderName: "spire", Bundles: p, Clock: clk, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Acquire(t.Context(), web); err != nil {
		t.Fatal(err)
	}
	settled := func(ci identity.CertInfo) bool { return ci.State == identity.StateValid && !ci.NextRefresh.IsZero() }
	cur := waitCert(t, m, settled)
	if cur.Provider != "spire" {
		t.Fatalf("inspect view names provider %q, want spire", cur.Provider)
	}
	for i := range 2 {
		clk.Advance(cur.NextRefresh.Sub(clk.Now()) + time.Second)
		next := waitCert(t, m, func(ci identity.CertInfo) bool { return ci.Serial != cur.Serial && settled(ci) })
		if !next.NotAfter.After(cur.NotAfter) {
			t.Fatalf("rotation %d: new SVID expires %s, not after %s", i+1, next.NotAfter, cur.NotAfter)
		}
		if got := subs.Load(); got != int32(i+2) {
			t.Fatalf("rotation %d: %d SVID subscriptions, want %d", i+1, got, i+2)
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
