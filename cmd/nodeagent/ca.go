package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/istioca"
	"github.com/warren-mesh/warren/pkg/identity/spire"
)

// caProviders lists the --ca-provider values. A CA service of warren's own
// is planned; until it exists its name is refused like any unknown value.
var caProviders = []string{"builtin", "spire", "istiod"}

// caOptions are --ca-provider and the settings of each provider.
type caOptions struct {
	provider string

	dir      string // builtin
	generate bool   // builtin

	spireAdminSocket string // spire

	istiodAddr      string // istiod
	istiodRootCA    string // istiod
	istiodTokenFile string // istiod
}

// caFlagOwner maps each provider-specific flag to the provider that reads it.
var caFlagOwner = map[string]string{
	"ca-dir":             "builtin",
	"ca-generate":        "builtin",
	"spire-admin-socket": "spire",
	"istiod-addr":        "istiod",
	"istiod-root-ca":     "istiod",
	"istiod-token-file":  "istiod",
}

// addFlags registers --ca-provider and the providers' flags.
func (c *caOptions) addFlags(f *pflag.FlagSet) {
	f.StringVar(&c.provider, "ca-provider", "builtin", "who signs workload certificates: builtin (in-process CA, key and root in --ca-dir), "+
		"spire (the node's SPIRE agent through its Delegated Identity API, --spire-admin-socket) or "+
		"istiod (Istio's CA, CreateCertificate impersonating each pod: --istiod-addr, --istiod-root-ca, --istiod-token-file)")
	f.StringVar(&c.dir, "ca-dir", "/var/lib/warren/ca", "built-in CA directory: ca-cert.pem, ca-key.pem, optional root-cert.pem and cert-chain.pem (--ca-provider=builtin)")
	f.BoolVar(&c.generate, "ca-generate", false, "create a self-signed root in --ca-dir if it holds none (--ca-provider=builtin)")
	f.StringVar(&c.spireAdminSocket, "spire-admin-socket", "", "the SPIRE agent's admin socket (its admin_socket_path); the agent must list this node agent's SPIFFE ID in authorized_delegates (--ca-provider=spire)")
	f.StringVar(&c.istiodAddr, "istiod-addr", "istiod.istio-system.svc:15012", "address of Istio's CA (IstioCertificateService); its host is the TLS server name checked (--ca-provider=istiod)")
	f.StringVar(&c.istiodRootCA, "istiod-root-ca", "/var/run/secrets/istio/root-cert.pem", "PEM roots that verify the CA's serving certificate, re-read at each connection (Istio's istio-ca-root-cert ConfigMap) (--ca-provider=istiod)")
	f.StringVar(&c.istiodTokenFile, "istiod-token-file", "/var/run/secrets/tokens/istio-token", "service-account token sent to the CA, re-read at each request (a projected token with audience istio-ca) (--ca-provider=istiod)")
}

// validate checks --ca-provider and that no flag of another provider was set
// (set on the command line or through its environment variable): such a flag
// would be ignored, which usually means --ca-provider was forgotten.
func (c *caOptions) validate(changed func(flag string) bool) error {
	if !slices.Contains(caProviders, c.provider) {
		return fmt.Errorf("--ca-provider %q: want one of %s (%s)", c.provider, strings.Join(caProviders, ", "), envName("ca-provider"))
	}
	var stray []string
	for flag, owner := range caFlagOwner {
		if owner != c.provider && changed(flag) {
			stray = append(stray, fmt.Sprintf("--%s (for --ca-provider=%s)", flag, owner))
		}
	}
	if len(stray) > 0 {
		slices.Sort(stray)
		return fmt.Errorf("--ca-provider=%s ignores %s: remove it or select that provider", c.provider, strings.Join(stray, ", "))
	}
	if c.provider == "spire" && c.spireAdminSocket == "" {
		return fmt.Errorf("--ca-provider=spire needs --spire-admin-socket (%s): the path of the SPIRE agent's admin_socket_path", envName("spire-admin-socket"))
	}
	return nil
}

// identityStack is the certificate provider --ca-provider selects and the
// Manager that holds and renews the node's workload certificates through it.
type identityStack struct {
	// name is the --ca-provider value; it names the provider in metrics,
	// /certs, readiness and errors.
	name string
	// certs is the Manager.
	certs *identity.Manager
	// run keeps the provider current while the agent runs (SPIRE's bundle
	// stream); nil when there is nothing to run.
	run func(ctx context.Context) error
	// closers release the provider's connections, after the Manager.
	closers []func() error
}

// identityDeps is what the stack needs from the rest of the agent.
type identityDeps struct {
	trustDomain spiffeid.TrustDomain
	// clusterID goes to istiod in the ClusterID header ("" sends none).
	clusterID string
	// nodeHas reports whether a pod of this node has an identity: the built-in
	// CA signs nothing else.
	nodeHas  func(identity.Identity) bool
	log      *slog.Logger
	registry prometheus.Registerer
}

// newIdentityStack builds the provider named by o.provider (validated) and a
// Manager over it. It is the only place the agent constructs a provider.
func newIdentityStack(o *caOptions, d identityDeps) (*identityStack, error) {
	s := &identityStack{name: o.provider}
	mopts := identity.Options{ProviderName: o.provider, Logger: d.log, Registry: d.registry}
	switch o.provider {
	case "builtin":
		ca, err := builtinca.LoadDir(o.dir, o.generate, builtinca.Options{TrustDomain: d.trustDomain, NodeHas: d.nodeHas})
		if err != nil {
			return nil, fmt.Errorf("--ca-provider=builtin: %w (--ca-dir must hold ca-cert.pem and ca-key.pem; --ca-generate creates a self-signed root)", err)
		}
		mopts.Provider = ca
	case "spire":
		p, err := spire.New(spire.Options{AdminSocket: o.spireAdminSocket, Logger: d.log})
		if err != nil {
			return nil, fmt.Errorf("--ca-provider=spire: %w", err)
		}
		s.closers = append(s.closers, p.Close)
		s.run = p.Run
		// SPIRE's bundle changes between fetches: peers are verified against
		// the bundle stream Run follows.
		mopts.Provider, mopts.Bundles = p, p
	case "istiod":
		c, err := newIstiodClient(o, d.clusterID)
		if err != nil {
			return nil, fmt.Errorf("--ca-provider=istiod: %w", err)
		}
		s.closers = append(s.closers, c.Close)
		mopts.Provider = c
	default:
		return nil, fmt.Errorf("--ca-provider %q: want one of %s", o.provider, strings.Join(caProviders, ", "))
	}
	m, err := identity.NewManager(mopts)
	if err != nil {
		s.close()
		return nil, fmt.Errorf("certificate manager for --ca-provider=%s: %w", o.provider, err)
	}
	s.certs = m
	return s, nil
}

// close stops the Manager, then the provider's connections.
func (s *identityStack) close() error {
	var errs []error
	if s.certs != nil {
		errs = append(errs, s.certs.Close())
	}
	for _, c := range s.closers {
		errs = append(errs, c())
	}
	return errors.Join(errs...)
}

// newIstiodClient builds the IstioCertificateService client. The root and
// token files must be readable at start, so a missing mount stops the agent
// with its name instead of surfacing later as a fetch error.
func newIstiodClient(o *caOptions, clusterID string) (*istioca.Client, error) {
	host, _, err := net.SplitHostPort(o.istiodAddr)
	if err != nil {
		return nil, fmt.Errorf("--istiod-addr %q: want host:port, e.g. istiod.istio-system.svc:15012: %w", o.istiodAddr, err)
	}
	if _, err := readRoots(o.istiodRootCA); err != nil {
		return nil, err
	}
	if _, err := os.Stat(o.istiodTokenFile); err != nil {
		return nil, fmt.Errorf("--istiod-token-file: %w (mount a projected service-account token with audience istio-ca there)", err)
	}
	c, err := istioca.New(istioca.Options{
		Addr:      o.istiodAddr,
		TLS:       istiodTLS(o.istiodRootCA, host),
		TokenFile: o.istiodTokenFile,
		ClusterID: clusterID,
	})
	if err != nil {
		return nil, fmt.Errorf("istiod client for %s: %w", o.istiodAddr, err)
	}
	return c, nil
}

// readRoots reads a PEM bundle of root certificates.
func readRoots(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--istiod-root-ca: %w (mount Istio's istio-ca-root-cert ConfigMap there)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("--istiod-root-ca %s: no PEM certificate in it", path)
	}
	return pool, nil
}

// istiodTLS verifies istiod's serving certificate for serverName against the
// roots in rootFile, read again at each handshake so that a rotated root
// (the ConfigMap volume updating in place) needs no agent restart.
func istiodTLS(rootFile, serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// Verified in VerifyConnection against the current roots instead.
		InsecureSkipVerify: true, //nolint:gosec // verified below
		VerifyConnection: func(cs tls.ConnectionState) error {
			roots, err := readRoots(rootFile)
			if err != nil {
				return err
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("istiod presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err = cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: serverName, Roots: roots, Intermediates: inter})
			if err != nil {
				return fmt.Errorf("verify istiod's certificate against %s: %w", rootFile, err)
			}
			return nil
		},
	}
}
