// Package spire obtains workload certificates from a SPIRE agent on the same
// node: the node agent's --ca-provider=spire, with --spire-admin-socket
// naming the SPIRE agent's admin socket. The node agent is an authorized
// delegate of the SPIRE agent (authorized_delegates in its configuration;
// the SPIRE agent attests the caller of its admin socket like any workload,
// so the node agent needs a registration entry of its own) and asks for the
// X.509-SVIDs of the workloads on this node through the Delegated Identity
// API: SubscribeToX509SVIDs by selectors (by default k8s:ns:<namespace> and
// k8s:sa:<service-account>, as ztunnel does) and SubscribeToX509Bundles for
// the trust bundles, which Run keeps current.
package spire

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/warren-mesh/warren/pkg/identity"
)

// Options configure a Provider.
type Options struct {
	// AdminSocket is the path of the SPIRE agent's admin socket
	// (admin_socket_path), which serves the Delegated Identity API. Required.
	AdminSocket string
	// Selectors maps an identity to the selectors of its registration entry;
	// KubernetesSelectors when nil.
	Selectors func(identity.Identity) []*types.Selector
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// KubernetesSelectors are the selectors SPIRE's k8s workload attestor gives
// a pod: k8s:ns:<namespace> and k8s:sa:<service-account>.
func KubernetesSelectors(id identity.Identity) []*types.Selector {
	return []*types.Selector{
		{Type: "k8s", Value: "ns:" + id.Namespace},
		{Type: "k8s", Value: "sa:" + id.ServiceAccount},
	}
}

// Provider is an identity.Provider backed by a SPIRE agent. It is also an
// x509bundle.Source holding the latest bundles the agent announced; pass it
// as identity.Options.Bundles, and call Run to keep it current.
type Provider struct {
	opts   Options
	log    *slog.Logger
	conn   *grpc.ClientConn
	client delegatedv1.DelegatedIdentityClient

	mu      sync.Mutex
	bundles map[spiffeid.TrustDomain]*x509bundle.Bundle
}

// New returns a Provider for the agent whose admin socket is opts.AdminSocket.
// It connects lazily: an agent that is not up yet is reported by Fetch.
func New(opts Options) (*Provider, error) {
	if opts.AdminSocket == "" {
		return nil, errors.New("spire provider: no admin socket")
	}
	if opts.Selectors == nil {
		opts.Selectors = KubernetesSelectors
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	conn, err := grpc.NewClient("unix://"+opts.AdminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("spire provider: admin socket %s: %w", opts.AdminSocket, err)
	}
	return &Provider{
		opts:    opts,
		log:     log.With("component", "identity/spire"),
		conn:    conn,
		client:  delegatedv1.NewDelegatedIdentityClient(conn),
		bundles: make(map[spiffeid.TrustDomain]*x509bundle.Bundle),
	}, nil
}

// Close closes the connection to the agent.
func (p *Provider) Close() error { return p.conn.Close() }

// Fetch returns the SVID the agent holds for id and the bundle of id's trust
// domain. It subscribes with id's selectors and waits, until ctx ends, for an
// update that carries id's SVID (a new registration entry takes a few seconds
// to reach the agent).
func (p *Provider) Fetch(ctx context.Context, id identity.Identity) (*x509svid.SVID, *x509bundle.Bundle, error) {
	svid, err := p.fetchSVID(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	bundle, err := p.bundleFor(ctx, id.TrustDomain)
	if err != nil {
		return nil, nil, fmt.Errorf("fetch %s from spire: %w", id, err)
	}
	return svid, bundle, nil
}

func (p *Provider) fetchSVID(ctx context.Context, id identity.Identity) (*x509svid.SVID, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sel := p.opts.Selectors(id)
	stream, err := p.client.SubscribeToX509SVIDs(ctx, &delegatedv1.SubscribeToX509SVIDsRequest{Selectors: sel})
	if err != nil {
		return nil, p.rpcError(fmt.Sprintf("subscribe to X.509-SVIDs of %s", id), err)
	}
	var seen []string
	for {
		resp, err := stream.Recv()
		if err != nil {
			// The agent learns the deadline too and may end the stream (EOF)
			// a moment before our own context notices it.
			deadline, hasDeadline := ctx.Deadline()
			timedOut := ctx.Err() != nil || status.Code(err) == codes.DeadlineExceeded ||
				(errors.Is(err, io.EOF) && hasDeadline && !time.Now().Before(deadline.Add(-time.Second)))
			if timedOut {
				return nil, fmt.Errorf("fetch %s from spire: no SVID for selectors %s (last update had %v; is there a registration entry for this node?): %w",
					id, selectorString(sel), seen, cmp.Or(context.Cause(ctx), err))
			}
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("fetch %s from spire: agent at %s ended the SVID stream", id, p.opts.AdminSocket)
			}
			return nil, p.rpcError(fmt.Sprintf("receive X.509-SVIDs of %s", id), err)
		}
		seen = seen[:0]
		for _, s := range resp.GetX509Svids() {
			got := idString(s.GetX509Svid().GetId())
			if got != id.String() {
				seen = append(seen, got)
				continue
			}
			svid, err := parseSVID(s)
			if err != nil {
				return nil, fmt.Errorf("fetch %s from spire: %w", id, err)
			}
			return svid, nil
		}
	}
}

func parseSVID(s *delegatedv1.X509SVIDWithKey) (*x509svid.SVID, error) {
	var der []byte
	for _, c := range s.GetX509Svid().GetCertChain() {
		der = append(der, c...)
	}
	svid, err := x509svid.ParseRaw(der, s.GetX509SvidKey())
	if err != nil {
		return nil, fmt.Errorf("parse SVID from agent: %w", err)
	}
	return svid, nil
}

func idString(id *types.SPIFFEID) string {
	if id == nil {
		return ""
	}
	return "spiffe://" + id.GetTrustDomain() + id.GetPath()
}

func selectorString(sel []*types.Selector) string {
	var parts []string
	for _, s := range sel {
		parts = append(parts, s.GetType()+":"+s.GetValue())
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// rpcError explains the usual causes of the agent's errors.
func (p *Provider) rpcError(op string, err error) error {
	switch status.Code(err) {
	case codes.Unavailable:
		return fmt.Errorf("%s: SPIRE agent unreachable at %s: %w", op, p.opts.AdminSocket, err)
	case codes.PermissionDenied:
		return fmt.Errorf("%s: SPIRE agent refused (is this node agent's SPIFFE ID registered and in authorized_delegates?): %w", op, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// GetX509BundleForTrustDomain returns the latest bundle the agent announced
// for td; it implements x509bundle.Source.
func (p *Provider) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, ok := p.bundles[td]
	if !ok {
		return nil, fmt.Errorf("spire: no X.509 bundle for trust domain %q", td)
	}
	return b, nil
}

// bundleFor returns td's bundle, asking the agent once when none is known yet.
func (p *Provider) bundleFor(ctx context.Context, td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if b, err := p.GetX509BundleForTrustDomain(td); err == nil {
		return b, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := p.client.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return nil, p.rpcError("subscribe to X.509 bundles", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, p.rpcError("receive X.509 bundles", err)
	}
	if err := p.storeBundles(resp); err != nil {
		return nil, err
	}
	return p.GetX509BundleForTrustDomain(td)
}

func (p *Provider) storeBundles(resp *delegatedv1.SubscribeToX509BundlesResponse) error {
	next := make(map[spiffeid.TrustDomain]*x509bundle.Bundle)
	for name, der := range resp.GetCaCertificates() {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return fmt.Errorf("bundle from agent: trust domain %q: %w", name, err)
		}
		certs, err := x509.ParseCertificates(der)
		if err != nil {
			return fmt.Errorf("bundle from agent for %s: %w", td, err)
		}
		if len(certs) == 0 {
			return fmt.Errorf("bundle from agent for %s: no certificates", td)
		}
		next[td] = x509bundle.FromX509Authorities(td, certs)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for td, b := range next {
		if old, ok := p.bundles[td]; !ok || !old.Equal(b) {
			p.log.Info("trust bundle updated", "trust_domain", td, "authorities", len(b.X509Authorities()))
		}
	}
	// The agent sends every bundle each time: one that is gone was removed.
	p.bundles = next
	return nil
}

// Run keeps the bundles current from the agent's SubscribeToX509Bundles
// stream until ctx ends, reconnecting with back-off (500 ms to 30 s).
func (p *Provider) Run(ctx context.Context) error {
	delay := 500 * time.Millisecond
	for {
		got, err := p.watchBundles(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if got {
			delay = 500 * time.Millisecond
		}
		p.log.Warn("bundle stream ended", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// watchBundles reads one bundle stream, reporting whether it got anything.
func (p *Provider) watchBundles(ctx context.Context) (bool, error) {
	stream, err := p.client.SubscribeToX509Bundles(ctx, &delegatedv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return false, p.rpcError("subscribe to X.509 bundles", err)
	}
	got := false
	for {
		resp, err := stream.Recv()
		if err != nil {
			return got, p.rpcError("receive X.509 bundles", err)
		}
		if err := p.storeBundles(resp); err != nil {
			p.log.Warn("bad bundle update from agent", "error", err)
			continue
		}
		got = true
	}
}
