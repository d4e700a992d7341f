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
// rotation needs no restart) and verify the server; Pool forces TLS 1.3,
// ALPN h2 and AES-GCM on a clone of it.
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

// aesGCM reports whether a TLS 1.3 suite is one HBONE allows.
func aesGCM(suite uint16) bool {
	return suite == tls.TLS_AES_128_GCM_SHA256 || suite == tls.TLS_AES_256_GCM_SHA384
}

// harden forces HBONE's TLS parameters on a clone of cfg: TLS 1.3 only,
// ALPN h2, no session resumption, AES-GCM. Go does not let
// TLS 1.3 suites be configured, so a ChaCha20 handshake is refused after
// the fact in VerifyConnection.
func harden(cfg *tls.Config) *tls.Config {
	cfg = cfg.Clone()
	cfg.MinVersion = tls.VersionTLS13
	cfg.MaxVersion = tls.VersionTLS13
	cfg.NextProtos = []string{http2.NextProtoTLS}
	// No resumption: every handshake verifies the peer's current chain, so
	// an expired or revoked SVID cannot ride on an old session ticket.
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
