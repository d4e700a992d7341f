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

// caProviders lists the --ca-provider values.
var caProviders = []string{"builtin", "spire", "istiod", "warren"}

// caOptions are --ca-provider and the settings of each provider.
type caOptions struct {
	provider string

	dir      string // builtin
	generate bool   // builtin

	spireAdminSocket string // spire

	istiodAddr      string // istiod
	istiodRootCA    string // istiod
	istiodTokenFile string // istiod

	warrenAddr      string // warren
	warrenRootCert  string // warren
	warrenTokenFile string // warren
}

// caFlagOwner maps each provider-specific flag to the provider that reads it.
var caFlagOwner = map[string]string{
	"ca-dir":             "builtin",
	"ca-generate":        "builtin",
	"spire-admin-socket": "spire",
	"istiod-addr":        "istiod",
	"istiod-root-ca":     "istiod",
	"istiod-token-file":  "istiod",
	"ca-addr":            "warren",
	"ca-root-cert":       "warren",
	"ca-token-file":      "warren",
}

// addFlags registers --ca-provider and the providers' flags.
func (c *caOptions) addFlags(f *pflag.FlagSet) {
	f.StringVar(&c.provider, "ca-provider", "builtin", "who signs workload certificates: builtin (in-process CA, key and root in --ca-dir), "+
		"spire (the node's SPIRE agent through its Delegated Identity API, --spire-admin-socket) or "+
		"istiod (Istio's CA, CreateCertificate impersonating each pod: --istiod-addr, --istiod-root-ca, --istiod-token-file) or "+
		"warren (warren's CA service, `nodeagent ca serve`, the same API and client as istiod: --ca-addr, --ca-root-cert, --ca-token-file)")
	f.StringVar(&c.dir, "ca-dir", "/var/lib/warren/ca", "built-in CA directory: ca-cert.pem, ca-key.pem, optional root-cert.pem and cert-chain.pem (--ca-provider=builtin)")
	f.BoolVar(&c.generate, "ca-generate", false, "create a self-signed root in --ca-dir if it holds none (--ca-provider=builtin)")
	f.StringVar(&c.spireAdminSocket, "spire-admin-socket", "", "the SPIRE agent's admin socket (its admin_socket_path); the agent must list this node agent's SPIFFE ID in authorized_delegates (--ca-provider=spire)")
	f.StringVar(&c.istiodAddr, "istiod-addr", "istiod.istio-system.svc:15012", "address of Istio's CA (IstioCertificateService); its host is the TLS server name checked (--ca-provider=istiod)")
	f.StringVar(&c.istiodRootCA, "istiod-root-ca", "/var/run/secrets/istio/root-cert.pem", "PEM roots that verify the CA's serving certificate, re-read at each connection (Istio's istio-ca-root-cert ConfigMap) (--ca-provider=istiod)")
	f.StringVar(&c.istiodTokenFile, "istiod-token-file", "/var/run/secrets/tokens/istio-token", "service-account token sent to the CA, re-read at each request (a projected token with audience istio-ca) (--ca-provider=istiod)")
	f.StringVar(&c.warrenAddr, "ca-addr", "warren-ca.warren-system.svc:15012", "address of warren's CA service (warren-ca.<release namespace>.svc:15012); its host is the TLS server name checked (--ca-provider=warren)")
	f.StringVar(&c.warrenRootCert, "ca-root-cert", "/var/run/secrets/warren/root/root-cert.pem", "PEM root certificate(s) that verify the CA service's serving certificate and the mesh's peers, re-read at each connection (the chart's root ConfigMap; no key) (--ca-provider=warren)")
	f.StringVar(&c.warrenTokenFile, "ca-token-file", "/var/run/secrets/tokens/warren-ca-token", "projected ServiceAccount token (audience istio-ca, bound to the agent's pod) sent to the CA service, re-read at each request (--ca-provider=warren)")
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
		c, err := newIstiodClient(caClientFlags{provider: "istiod", addr: o.istiodAddr, root: o.istiodRootCA, token: o.istiodTokenFile,
			addrFlag: "--istiod-addr", rootFlag: "--istiod-root-ca", tokenFlag: "--istiod-token-file",
			rootHint: "mount Istio's istio-ca-root-cert ConfigMap there", addrExample: "istiod.istio-system.svc:15012"}, d.clusterID)
		if err != nil {
			return nil, fmt.Errorf("--ca-provider=istiod: %w", err)
		}
		s.closers = append(s.closers, c.Close)
		mopts.Provider = c
	case "warren":
		// The same client as istiod's: warren's CA service speaks its API.
		c, err := newIstiodClient(caClientFlags{provider: "warren", addr: o.warrenAddr, root: o.warrenRootCert, token: o.warrenTokenFile,
			addrFlag: "--ca-addr", rootFlag: "--ca-root-cert", tokenFlag: "--ca-token-file",
			rootHint: "mount the chart's root-certificate ConfigMap there", addrExample: "warren-ca.warren-system.svc:15012"}, "")
		if err != nil {
			return nil, fmt.Errorf("--ca-provider=warren: %w", err)
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

// caClientFlags are the settings of an IstioCertificateService client and
// the names of the flags they came from, for errors.
type caClientFlags struct {
	provider, addr, root, token   string
	addrFlag, rootFlag, tokenFlag string
	rootHint, addrExample         string
}

// newIstiodClient builds the IstioCertificateService client of istiod or of
// warren's CA service. The root and token files must be readable at start,
// so a missing mount stops the agent with its name instead of surfacing
// later as a fetch error.
func newIstiodClient(f caClientFlags, clusterID string) (*istioca.Client, error) {
	host, _, err := net.SplitHostPort(f.addr)
	if err != nil {
		return nil, fmt.Errorf("%s %q: want host:port, e.g. %s: %w", f.addrFlag, f.addr, f.addrExample, err)
	}
	if _, err := readRoots(f.root, f.rootFlag, f.rootHint); err != nil {
		return nil, err
	}
	if _, err := os.Stat(f.token); err != nil {
		return nil, fmt.Errorf("%s: %w (mount a projected service-account token with audience istio-ca there)", f.tokenFlag, err)
	}
	c, err := istioca.New(istioca.Options{
		Addr:      f.addr,
		TLS:       istiodTLS(f.root, host, f.rootFlag, f.rootHint),
		TokenFile: f.token,
		ClusterID: clusterID,
	})
	if err != nil {
		return nil, fmt.Errorf("%s CA client for %s: %w", f.provider, f.addr, err)
	}
	return c, nil
}

// readRoots reads a PEM bundle of root certificates from path, given by flag.
func readRoots(path, flag, hint string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (%s)", flag, err, hint)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s %s: no PEM certificate in it", flag, path)
	}
	return pool, nil
}

// istiodTLS verifies the CA's serving certificate for serverName against the
// roots in rootFile, read again at each handshake so that a rotated root
// (the ConfigMap volume updating in place) needs no agent restart.
func istiodTLS(rootFile, serverName, flag, hint string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// Verified in VerifyConnection against the current roots instead.
		InsecureSkipVerify: true, //nolint:gosec // verified below
		VerifyConnection: func(cs tls.ConnectionState) error {
			roots, err := readRoots(rootFile, flag, hint)
			if err != nil {
				return err
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the CA presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err = cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: serverName, Roots: roots, Intermediates: inter})
			if err != nil {
				return fmt.Errorf("verify the CA's certificate for %s against %s: %w", serverName, rootFile, err)
			}
			return nil
		},
	}
}
