package caserver

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/warren-mesh/warren/pkg/identity/builtinca"
)

// DefaultServingTTL is the validity of the CA service's own certificate.
const DefaultServingTTL = 24 * time.Hour

// ServingCert is the CA service's TLS certificate, signed by the CA it
// serves for the names clients dial (the Service's DNS names, or IP
// addresses), and renewed at half-life by the handshake that finds it old:
// clients verify it with the root certificate alone, and it rotates without
// a restart.
type ServingCert struct {
	ca    *builtinca.CA
	dns   []string
	ips   []net.IP
	uri   *url.URL
	ttl   time.Duration
	now   func() time.Time
	mu    sync.Mutex
	cur   *tls.Certificate
	renew time.Time
}

// NewServingCert issues a first certificate for names (each a DNS name or
// an IP address) and uri (optional URI SAN), valid for ttl
// (DefaultServingTTL when zero). now defaults to time.Now.
func NewServingCert(ca *builtinca.CA, names []string, uri *url.URL, ttl time.Duration, now func() time.Time) (*ServingCert, error) {
	if ttl <= 0 {
		ttl = DefaultServingTTL
	}
	if now == nil {
		now = time.Now
	}
	s := &ServingCert{ca: ca, uri: uri, ttl: ttl, now: now}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			s.ips = append(s.ips, ip)
		} else if n != "" {
			s.dns = append(s.dns, n)
		}
	}
	if len(s.dns) == 0 && len(s.ips) == 0 {
		return nil, errors.New("serving certificate: no name: give the DNS names (or IPs) clients dial, e.g. warren-ca.warren-system.svc")
	}
	if _, err := s.get(); err != nil {
		return nil, err
	}
	return s, nil
}

// get returns the current certificate, issuing a new one past half-life.
func (s *ServingCert) get() (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if s.cur != nil && now.Before(s.renew) {
		return s.cur, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: generate key: %w", err)
	}
	chain, err := s.ca.IssueServer(key.Public(), s.dns, s.ips, s.uri, s.ttl)
	if err != nil {
		if s.cur != nil && now.Before(s.cur.Leaf.NotAfter) {
			return s.cur, nil // keep the valid one; retried at the next handshake
		}
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	s.cur = c
	s.renew = chain[0].NotBefore.Add(chain[0].NotAfter.Sub(chain[0].NotBefore) / 2)
	return c, nil
}

// Leaf returns the certificate currently presented.
func (s *ServingCert) Leaf() *x509.Certificate {
	c, err := s.get()
	if err != nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.cur.Leaf
	}
	return c.Leaf
}

// TLSConfig returns the server's TLS configuration: TLS 1.2 or later, the
// current certificate at each handshake, HTTP/2 (gRPC) negotiated by ALPN.
func (s *ServingCert) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.get() },
	}
}
