package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/hbone"
)

// The TLS configurations below carry HBONE's TLS rules (TLS 1.3, AES-GCM,
// ALPN h2, no resumption) by passing through hbone.HardenTLS, their one
// owner; see its documentation for why identity imports hbone and not the
// reverse. What this file adds is who presents which certificate and whose
// certificates are accepted.

// ClientConfig returns the TLS configuration for an HBONE connection made on
// behalf of workload src to a peer that must present one of expected:
// HBONE's TLS rules (hbone.HardenTLS), src's current SVID as the client
// certificate (src must be held, see Acquire), and the server's chain
// verified against the trust bundle of its own trust domain and its SPIFFE
// ID checked against expected.
func (m *Manager) ClientConfig(src spiffeid.ID, expected []spiffeid.ID) (*tls.Config, error) {
	id, err := FromSPIFFEID(src)
	if err != nil {
		return nil, fmt.Errorf("client tls config: %w", err)
	}
	if len(expected) == 0 {
		return nil, fmt.Errorf("client tls config for %s: no expected peer identities", src)
	}
	for _, p := range expected {
		if p.IsZero() {
			return nil, fmt.Errorf("client tls config for %s: empty expected peer identity", src)
		}
	}
	m.mu.Lock()
	_, ok := m.entries[id]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("client tls config for %s: identity not held (no pod on this node has it)", src)
	}
	allowed := append([]spiffeid.ID(nil), expected...)
	cfg := &tls.Config{
		// The server is authenticated by VerifyPeerCertificate against the
		// SPIFFE bundle and expected IDs; there is no hostname to check.
		InsecureSkipVerify: true, //nolint:gosec // SPIFFE verification below
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return m.certificate(cri.Context(), id)
		},
		VerifyPeerCertificate: m.verifyPeer("server", tlsconfig.AuthorizeOneOf(allowed...)),
		Time:                  m.clock.Now,
	}
	return hbone.HardenTLS(cfg), nil
}

// ServerIdentityFunc chooses which workload identity a server presents on an
// incoming connection. The node agent opens one HBONE listener per pod, inside
// the pod's network namespace, and passes StaticServerIdentity of that pod.
type ServerIdentityFunc func(hello *tls.ClientHelloInfo) (spiffeid.ID, error)

// StaticServerIdentity presents id on every connection.
func StaticServerIdentity(id spiffeid.ID) ServerIdentityFunc {
	return func(*tls.ClientHelloInfo) (spiffeid.ID, error) { return id, nil }
}

// ServerConfig returns the TLS configuration for HBONE's inbound listener:
// HBONE's TLS rules (hbone.HardenTLS) and a client certificate required. For
// each connection, choose picks the destination workload whose SVID is presented,
// and the client's chain is accepted when it verifies against the bundle of
// that workload's trust domain, whatever the client's identity: authorization
// decides who may connect, from the verified identity hbone.Server hands its
// Handler (ServerRequest.Peer).
func (m *Manager) ServerConfig(choose ServerIdentityFunc) (*tls.Config, error) {
	if choose == nil {
		return nil, errors.New("server tls config: no identity chooser")
	}
	base := hbone.HardenTLS(&tls.Config{
		ClientAuth: tls.RequireAnyClientCert, // verified by VerifyPeerCertificate
		Time:       m.clock.Now,
	})
	cfg := base.Clone()
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		sid, err := choose(hello)
		if err != nil {
			return nil, err
		}
		id, err := FromSPIFFEID(sid)
		if err != nil {
			return nil, fmt.Errorf("server identity: %w", err)
		}
		c := base.Clone()
		c.GetCertificate = func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return m.certificate(h.Context(), id)
		}
		c.VerifyPeerCertificate = m.verifyPeer("client", tlsconfig.AuthorizeMemberOf(id.TrustDomain))
		return c, nil
	}
	return cfg, nil
}

// verifyPeer verifies a peer's chain against the Manager's bundle source at
// the Manager's clock, and authorizes its ID.
func (m *Manager) verifyPeer(role string, authorize tlsconfig.Authorizer) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		id, chains, err := x509svid.ParseAndVerify(raw, m.peerBundles, x509svid.WithTime(m.clock.Now()))
		if err != nil {
			return fmt.Errorf("verify %s certificate: %w", role, err)
		}
		if err := authorize(id, chains); err != nil {
			return fmt.Errorf("authorize %s %s: %w", role, id, err)
		}
		return nil
	}
}
