package hbone

import (
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// ClientTLS supplies the TLS client configuration for a tunnel from src to
// a server that must present one of expected. The returned configuration
// must present src's certificate (through GetClientCertificate, so that
// rotation needs no restart) and verify the server; Pool applies HardenTLS
// to it.
type ClientTLS interface {
	ClientConfig(src spiffeid.ID, expected []spiffeid.ID) (*tls.Config, error)
}

// SPIFFEClientTLS is a ClientTLS built from go-spiffe sources.
type SPIFFEClientTLS struct {
	// SVID returns the certificate source of a local identity.
	SVID func(src spiffeid.ID) (x509svid.Source, error)
	// Bundles verifies servers' chains.
	Bundles x509bundle.Source
}

// ClientConfig returns an mTLS configuration presenting src's SVID and
// accepting a server only if its SPIFFE ID is one of expected.
func (t SPIFFEClientTLS) ClientConfig(src spiffeid.ID, expected []spiffeid.ID) (*tls.Config, error) {
	if len(expected) == 0 {
		return nil, errors.New("no expected server identity")
	}
	svid, err := t.SVID(src)
	if err != nil {
		return nil, fmt.Errorf("svid for %s: %w", src, err)
	}
	return tlsconfig.MTLSClientConfig(svid, t.Bundles, tlsconfig.AuthorizeOneOf(expected...)), nil
}

// ServerTLSConfig returns the server configuration HBONE needs: present
// svid's certificate, require a client certificate that chains to bundles
// and carries a SPIFFE ID in trust domain td. Who may connect is decided
// later by the Handler, which sees the peer's ID.
func ServerTLSConfig(svid x509svid.Source, bundles x509bundle.Source, td spiffeid.TrustDomain) *tls.Config {
	return hardenServer(tlsconfig.MTLSServerConfig(svid, bundles, tlsconfig.AuthorizeMemberOf(td)))
}

// ALPN is the only application protocol HBONE negotiates: HTTP/2 over TLS.
const ALPN = http2.NextProtoTLS

// aesGCM reports whether a TLS 1.3 suite is one HBONE allows.
func aesGCM(suite uint16) bool {
	return suite == tls.TLS_AES_128_GCM_SHA256 || suite == tls.TLS_AES_256_GCM_SHA384
}

// HardenTLS returns a clone of cfg with HBONE's TLS rules forced on it: TLS
// 1.3 only, ALPN h2 offered, no session tickets or client session cache (every
// handshake verifies the peer's current chain, so an expired or revoked SVID
// cannot ride on an old session), and a VerifyConnection that refuses any
// suite but AES-GCM (Go does not let TLS 1.3 suites be configured) before
// calling cfg's own VerifyConnection. Applying it twice is harmless.
//
// The negotiated ALPN is checked after the handshake by Pool and Server (a
// Server counts a client without h2 as RefusedALPN), so configurations used
// outside them must check ConnectionState().NegotiatedProtocol == ALPN.
//
// These rules have one owner, this function: Pool and Server apply it to
// every configuration they are given, and pkg/identity applies it to the
// configurations its Manager builds. identity imports hbone, not the other
// way round, because the rules belong to the wire protocol this package
// implements, while identity is one source of certificates among others
// (SPIFFEClientTLS, tests): hbone imports nothing of warren's and stays usable
// without the certificate manager, its CA providers and their metrics.
func HardenTLS(cfg *tls.Config) *tls.Config {
	cfg = cfg.Clone()
	cfg.MinVersion = tls.VersionTLS13
	cfg.MaxVersion = tls.VersionTLS13
	cfg.NextProtos = []string{ALPN}
	cfg.SessionTicketsDisabled = true
	cfg.ClientSessionCache = nil
	next := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if !aesGCM(cs.CipherSuite) {
			return fmt.Errorf("cipher suite %s not allowed: HBONE needs AES-GCM", tls.CipherSuiteName(cs.CipherSuite))
		}
		if next != nil {
			return next(cs)
		}
		return nil
	}
	return cfg
}

// harden is HardenTLS, for the Pool and Server in this package.
func harden(cfg *tls.Config) *tls.Config { return HardenTLS(cfg) }

// hardenServer hardens cfg and whatever its GetConfigForClient returns, and
// refuses a per-client configuration that does not require client certificates.
func hardenServer(cfg *tls.Config) *tls.Config {
	cfg = harden(cfg)
	if get := cfg.GetConfigForClient; get != nil {
		cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			c, err := get(hello)
			if err != nil || c == nil {
				return c, err
			}
			if c.ClientAuth < tls.RequireAnyClientCert {
				return nil, errors.New("hbone: TLS config must require client certificates")
			}
			c = harden(c)
			c.GetConfigForClient = nil
			return c, nil
		}
	}
	return cfg
}
