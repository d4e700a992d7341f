// Package testpki is a small certificate authority for tests: it issues
// ECDSA P-256 X.509-SVIDs (spiffe://<trust-domain>/ns/<ns>/sa/<sa>) and the
// matching trust bundles, including deliberately broken certificates
// (expired, not yet valid, no URI SAN) for negative tests.
//
// A certificate from another trust domain's CA, or from another CA of the same
// trust domain, is made by creating a second CA with NewCA and issuing from it.
//
//	ca := testpki.NewCA(t, "cluster.local")
//	svid := ca.IssueWorkload(t, "default", "client")
//	cfg := tlsconfig.MTLSClientConfig(svid.X509, ca.Bundle(), tlsconfig.AuthorizeAny())
//
// Keys and certificates live in memory only; nothing is written to disk.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// DefaultTTL is the lifetime of an issued certificate unless an option changes it.
const DefaultTTL = time.Hour

// CA is an in-memory root certificate authority for one trust domain.
type CA struct {
	td   spiffeid.TrustDomain
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

// NewCA creates a self-signed root CA for the trust domain (for example
// "cluster.local"). It fails the test when the trust domain is invalid.
func NewCA(tb testing.TB, trustDomain string) *CA {
	tb.Helper()
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		tb.Fatalf("testpki: trust domain %q: %v", trustDomain, err)
	}
	key := newKey(tb)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(tb),
		Subject:               pkix.Name{Organization: []string{"warren test"}, CommonName: "testpki root " + trustDomain},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatalf("testpki: create root: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("testpki: parse root: %v", err)
	}
	return &CA{td: td, key: key, cert: cert}
}

// TrustDomain returns the CA's trust domain.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// Root returns the CA's self-signed root certificate.
func (ca *CA) Root() *x509.Certificate { return ca.cert }

// Bundle returns an X.509 bundle holding the root; it is also an x509bundle.Source.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

// Pool returns a certificate pool holding the root.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// WorkloadID returns spiffe://<td>/ns/<ns>/sa/<sa> in the CA's trust domain.
func (ca *CA) WorkloadID(tb testing.TB, ns, sa string) spiffeid.ID {
	tb.Helper()
	return WorkloadID(tb, ca.td.Name(), ns, sa)
}

// WorkloadID returns spiffe://<td>/ns/<ns>/sa/<sa>.
func WorkloadID(tb testing.TB, trustDomain, ns, sa string) spiffeid.ID {
	tb.Helper()
	id, err := spiffeid.FromString("spiffe://" + trustDomain + "/ns/" + ns + "/sa/" + sa)
	if err != nil {
		tb.Fatalf("testpki: workload id: %v", err)
	}
	return id
}

// SVID is an issued certificate with its key, in the shapes TLS code needs.
type SVID struct {
	// ID is the SPIFFE ID the certificate was issued for (set even with NoURISAN).
	ID spiffeid.ID
	// TLS is the certificate chain (leaf only) and private key.
	TLS tls.Certificate
	// X509 is the same certificate as a go-spiffe SVID; it is an x509svid.Source.
	X509 *x509svid.SVID
}

// GetX509SVID makes an *SVID an x509svid.Source.
func (s *SVID) GetX509SVID() (*x509svid.SVID, error) { return s.X509, nil }

// Leaf returns the parsed leaf certificate.
func (s *SVID) Leaf() *x509.Certificate { return s.X509.Certificates[0] }

type options struct {
	notBefore, notAfter time.Time
	noURI               bool
	dnsNames            []string
}

// Option changes an issued certificate.
type Option func(*options)

// Expired issues a certificate whose validity ended an hour ago.
func Expired() Option {
	return func(o *options) {
		o.notBefore = time.Now().Add(-2 * time.Hour)
		o.notAfter = time.Now().Add(-time.Hour)
	}
}

// NotYetValid issues a certificate whose validity starts in an hour.
func NotYetValid() Option {
	return func(o *options) {
		o.notBefore = time.Now().Add(time.Hour)
		o.notAfter = time.Now().Add(2 * time.Hour)
	}
}

// TTL issues a certificate valid from a minute ago for d.
func TTL(d time.Duration) Option {
	return func(o *options) {
		o.notBefore = time.Now().Add(-time.Minute)
		o.notAfter = time.Now().Add(d)
	}
}

// NoURISAN issues a certificate without the SPIFFE URI SAN.
func NoURISAN() Option { return func(o *options) { o.noURI = true } }

// DNSNames adds DNS SANs to the certificate.
func DNSNames(names ...string) Option { return func(o *options) { o.dnsNames = names } }

// Issue signs a leaf X.509-SVID for id (which may be in any trust domain:
// issuing another domain's ID from this CA makes a mis-issued certificate).
func (ca *CA) Issue(tb testing.TB, id spiffeid.ID, opts ...Option) *SVID {
	tb.Helper()
	o := options{notBefore: time.Now().Add(-time.Minute), notAfter: time.Now().Add(DefaultTTL)}
	for _, opt := range opts {
		opt(&o)
	}
	key := newKey(tb)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(tb),
		Subject:               pkix.Name{Organization: []string{"warren test"}},
		NotBefore:             o.notBefore,
		NotAfter:              o.notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              o.dnsNames,
	}
	if !o.noURI {
		tmpl.URIs = []*url.URL{id.URL()}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		tb.Fatalf("testpki: issue %s: %v", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("testpki: parse leaf: %v", err)
	}
	return &SVID{
		ID:   id,
		TLS:  tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
		X509: &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key},
	}
}

// IssueWorkload issues an SVID for spiffe://<td>/ns/<ns>/sa/<sa>.
func (ca *CA) IssueWorkload(tb testing.TB, ns, sa string, opts ...Option) *SVID {
	tb.Helper()
	return ca.Issue(tb, ca.WorkloadID(tb, ns, sa), opts...)
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("testpki: generate key: %v", err)
	}
	return key
}

func serial(tb testing.TB) *big.Int {
	tb.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		tb.Fatalf("testpki: serial: %v", err)
	}
	return n
}
