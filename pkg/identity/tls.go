package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN is the application protocol HBONE negotiates.
const ALPN = "h2"

// ClientConfig returns the TLS configuration for an HBONE connection made on
// behalf of workload src to a peer that must present one of expected:
// TLS 1.3 only, AES-GCM only, ALPN h2, src's current SVID as the client
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
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		// The server is authenticated by VerifyPeerCertificate against the
		// SPIFFE bundle and expected IDs; there is no hostname to check.
		InsecureSkipVerify: true, //nolint:gosec // SPIFFE verification below
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return m.certificate(cri.Context(), id)
		},
		VerifyPeerCertificate: m.verifyPeer("server", tlsconfig.AuthorizeOneOf(allowed...)),
		VerifyConnection:      checkConnection,
		Time:                  m.clock.Now,
	}
	return cfg, nil
}

// ServerIdentityFunc chooses which workload identity a server presents on an
// incoming connection, typically from the connection's local address.
type ServerIdentityFunc func(hello *tls.ClientHelloInfo) (spiffeid.ID, error)

// StaticServerIdentity presents id on every connection.
func StaticServerIdentity(id spiffeid.ID) ServerIdentityFunc {
	return func(*tls.ClientHelloInfo) (spiffeid.ID, error) { return id, nil }
}

// ByLocalAddr presents the identity of the workload that owns the local IP
// address the connection arrived on (HBONE listens on each pod's IP).
func ByLocalAddr(lookup func(netip.Addr) (spiffeid.ID, bool)) ServerIdentityFunc {
	return func(hello *tls.ClientHelloInfo) (spiffeid.ID, error) {
		if hello.Conn == nil {
			return spiffeid.ID{}, errors.New("choose server identity: no connection")
		}
		la := hello.Conn.LocalAddr()
		ap, err := netip.ParseAddrPort(la.String())
		if tcp, ok := la.(*net.TCPAddr); ok {
			ap, err = tcp.AddrPort(), nil
		}
		if err != nil {
			return spiffeid.ID{}, fmt.Errorf("choose server identity: local address %s: %w", la, err)
		}
		addr := ap.Addr().Unmap()
		id, ok := lookup(addr)
		if !ok {
			return spiffeid.ID{}, fmt.Errorf("choose server identity: no workload on this node owns %s", addr)
		}
		return id, nil
	}
}

// ServerConfig returns the TLS configuration for HBONE's inbound listener:
// TLS 1.3 only, AES-GCM only, ALPN h2, a client certificate required. For each
// connection, choose picks the destination workload whose SVID is presented,
// and the client's chain is accepted when it verifies against the bundle of
// that workload's trust domain, whatever the client's identity: authorization
// decides who may connect, reading the identity with PeerID.
func (m *Manager) ServerConfig(choose ServerIdentityFunc) (*tls.Config, error) {
	if choose == nil {
		return nil, errors.New("server tls config: no identity chooser")
	}
	base := &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		ClientAuth: tls.RequireAnyClientCert, // verified by VerifyPeerCertificate
		// A resumed session would skip the client's chain: always verify it.
		SessionTicketsDisabled: true,
		VerifyConnection:       checkConnection,
		Time:                   m.clock.Now,
	}
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

// checkConnection holds both ends to what HBONE requires, whatever the peer offered.
func checkConnection(cs tls.ConnectionState) error {
	if cs.Version != tls.VersionTLS13 {
		return fmt.Errorf("hbone tls: negotiated %s, want TLS 1.3", tls.VersionName(cs.Version))
	}
	switch cs.CipherSuite {
	case tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384:
	default:
		return fmt.Errorf("hbone tls: negotiated %s, want AES-GCM", tls.CipherSuiteName(cs.CipherSuite))
	}
	if cs.NegotiatedProtocol != ALPN {
		return fmt.Errorf("hbone tls: negotiated ALPN %q, want %q", cs.NegotiatedProtocol, ALPN)
	}
	return nil
}

// PeerID returns the SPIFFE ID of the peer of an HBONE connection made with
// ClientConfig or ServerConfig. Their verification callbacks have already
// checked the chain, so the leaf's URI SAN is the authenticated identity.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if !cs.HandshakeComplete {
		return spiffeid.ID{}, errors.New("peer id: handshake not complete")
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer id: peer presented no certificate")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("peer id: %w", err)
	}
	return id, nil
}
