// Package builtinca is warren's embedded certificate authority: the node
// agent's --ca-provider=builtin (the binary's default, for the local-file mode
// and make demo), an identity.Provider that signs workload X.509-SVIDs itself,
// and the signer of the CA service (pkg/caserver, `nodeagent ca serve`), the
// only process that holds the key on Kubernetes. The CA key is loaded from a
// directory (--ca-dir; on Kubernetes the chart mounts its CA Secret there, into
// the CA service only, so nothing needs RBAC on Secrets), in Istio's plug-in
// CA layout:
//
//	ca-cert.pem     the signing CA certificate (required)
//	ca-key.pem      its private key (required)
//	root-cert.pem   the trust anchor(s); default: ca-cert.pem, which must then be self-signed
//	cert-chain.pem  intermediates between ca-cert.pem and the root (optional)
//
// A directory can be initialised with a new self-signed root on first use.
package builtinca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/identity"
)

// File names in a CA directory (and keys of the Secret mounted there).
const (
	CertFile  = "ca-cert.pem"
	KeyFile   = "ca-key.pem"
	RootFile  = "root-cert.pem"
	ChainFile = "cert-chain.pem"
)

// Defaults.
const (
	DefaultTTL     = 24 * time.Hour
	DefaultRootTTL = 10 * 365 * 24 * time.Hour
	// backdate is how far before "now" leaves become valid, for clock skew between nodes.
	backdate = time.Minute
)

// Options configure a CA.
type Options struct {
	// TrustDomain is the only trust domain the CA issues for. Required.
	TrustDomain spiffeid.TrustDomain
	// TTL of issued leaves; DefaultTTL (24 h) when zero.
	TTL time.Duration
	// Now defaults to time.Now.
	Now func() time.Time
	// NodeHas, when set, tells whether a pod on this node has an identity;
	// Fetch refuses the identities for which it returns false.
	NodeHas func(identity.Identity) bool
}

// CA signs workload certificates. It implements identity.Provider.
type CA struct {
	td      spiffeid.TrustDomain
	ttl     time.Duration
	now     func() time.Time
	nodeHas func(identity.Identity) bool

	cert   *x509.Certificate // signs leaves
	key    crypto.Signer
	chain  []*x509.Certificate // sent after the leaf: cert unless it is a root, then intermediates
	bundle *x509bundle.Bundle
}

// LoadDir loads the CA from dir. When dir has no ca-cert.pem and ca-key.pem
// and generate is true, it first writes a new self-signed root there (the key
// with mode 0600; the directory is created with mode 0700 if missing).
func LoadDir(dir string, generate bool, opts Options) (*CA, error) {
	data, err := readDir(dir)
	if errors.Is(err, fs.ErrNotExist) && generate {
		if err := initDir(dir, opts); err != nil {
			return nil, err
		}
		data, err = readDir(dir)
	}
	if err != nil {
		return nil, err
	}
	ca, err := New(data, opts)
	if err != nil {
		return nil, fmt.Errorf("load CA from %s: %w", dir, err)
	}
	return ca, nil
}

func readDir(dir string) (map[string][]byte, error) {
	data := make(map[string][]byte)
	for _, name := range []string{CertFile, KeyFile, RootFile, ChainFile} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		switch {
		case err == nil:
			data[name] = b
		case errors.Is(err, fs.ErrNotExist) && (name == RootFile || name == ChainFile):
		default:
			return nil, fmt.Errorf("read CA: %w", err)
		}
	}
	return data, nil
}

// initDir writes a new root into dir under an exclusive lock on dir/.lock, so
// agents starting together agree on one CA. Each file appears by rename, the
// key first, so a reader never sees a certificate without its key.
func initDir(dir string, opts Options) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create CA directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("lock CA directory: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock CA directory %s: %w", dir, err)
	}
	_, certErr := os.Stat(filepath.Join(dir, CertFile))
	_, keyErr := os.Stat(filepath.Join(dir, KeyFile))
	switch {
	case certErr == nil && keyErr == nil:
		return nil // another process initialised it meanwhile
	case certErr == nil || keyErr == nil:
		return fmt.Errorf("initialise CA in %s: only one of %s and %s exists; remove it or supply both", dir, CertFile, KeyFile)
	}
	certPEM, keyPEM, err := GenerateRoot(opts)
	if err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{{KeyFile, keyPEM, 0o600}, {CertFile, certPEM, 0o644}} {
		tmp, err := os.CreateTemp(dir, "."+f.name+".*")
		if err != nil {
			return fmt.Errorf("initialise CA in %s: %w", dir, err)
		}
		werr := tmp.Chmod(f.mode)
		if werr == nil {
			_, werr = tmp.Write(f.data)
		}
		if err := errors.Join(werr, tmp.Close()); err != nil {
			os.Remove(tmp.Name())
			return fmt.Errorf("write %s: %w", f.name, err)
		}
		if err := os.Rename(tmp.Name(), filepath.Join(dir, f.name)); err != nil {
			os.Remove(tmp.Name())
			return fmt.Errorf("write %s: %w", f.name, err)
		}
	}
	return nil
}

// GenerateRoot returns a new self-signed ECDSA P-256 root for opts.TrustDomain,
// valid for ten years, as PEM certificate and PKCS#8 key.
func GenerateRoot(opts Options) (certPEM, keyPEM []byte, err error) {
	if opts.TrustDomain.IsZero() {
		return nil, nil, errors.New("generate CA: no trust domain")
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	t := now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"warren"}, CommonName: "warren root CA " + opts.TrustDomain.Name()},
		URIs:                  []*url.URL{opts.TrustDomain.ID().URL()},
		NotBefore:             t.Add(-backdate),
		NotAfter:              t.Add(DefaultRootTTL),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("create CA certificate: %w", err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode CA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), nil
}

// New builds a CA from PEM data keyed by the file names above.
func New(data map[string][]byte, opts Options) (*CA, error) {
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("no trust domain")
	}
	ca := &CA{td: opts.TrustDomain, ttl: opts.TTL, now: opts.Now, nodeHas: opts.NodeHas}
	if ca.ttl <= 0 {
		ca.ttl = DefaultTTL
	}
	if ca.now == nil {
		ca.now = time.Now
	}
	certs, err := parseCerts(CertFile, data[CertFile])
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no certificate", CertFile)
	}
	ca.cert = certs[0]
	if !ca.cert.IsCA || ca.cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s (serial %x): not a CA certificate allowed to sign certificates", CertFile, ca.cert.SerialNumber)
	}
	if err := checkCATrustDomain(ca.cert, ca.td); err != nil {
		return nil, err
	}
	if ca.key, err = parseKey(data[KeyFile]); err != nil {
		return nil, err
	}
	if !publicKeysEqual(ca.key.Public(), ca.cert.PublicKey) {
		return nil, fmt.Errorf("%s does not match the key of %s", KeyFile, CertFile)
	}

	roots := []*x509.Certificate{ca.cert}
	if b, ok := data[RootFile]; ok {
		if roots, err = parseCerts(RootFile, b); err != nil {
			return nil, err
		}
		if len(roots) == 0 {
			return nil, fmt.Errorf("%s: no certificate", RootFile)
		}
	} else if !selfSigned(ca.cert) {
		return nil, fmt.Errorf("%s is not self-signed and there is no %s", CertFile, RootFile)
	}
	isRoot := func(c *x509.Certificate) bool {
		for _, r := range roots {
			if r.Equal(c) {
				return true
			}
		}
		return false
	}
	if !isRoot(ca.cert) {
		ca.chain = append(ca.chain, ca.cert)
	}
	more, err := parseCerts(ChainFile, data[ChainFile])
	if err != nil {
		return nil, err
	}
	for _, c := range more {
		if !isRoot(c) && !c.Equal(ca.cert) {
			ca.chain = append(ca.chain, c)
		}
	}
	ca.bundle = x509bundle.FromX509Authorities(ca.td, roots)

	// The signing certificate must chain to the roots and be valid now.
	if err := ca.checkValid(ca.now()); err != nil {
		return nil, err
	}
	return ca, nil
}

// checkValid reports whether the CA can sign at t.
func (ca *CA) checkValid(t time.Time) error {
	for _, c := range append([]*x509.Certificate{ca.cert}, ca.chain...) {
		if t.Before(c.NotBefore) {
			return fmt.Errorf("CA certificate %q (serial %x) not valid before %s", c.Subject, c.SerialNumber, c.NotBefore.UTC().Format(time.RFC3339))
		}
		if !t.Before(c.NotAfter) {
			return fmt.Errorf("CA certificate %q (serial %x) expired at %s", c.Subject, c.SerialNumber, c.NotAfter.UTC().Format(time.RFC3339))
		}
	}
	roots := x509.NewCertPool()
	for _, r := range ca.bundle.X509Authorities() {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range ca.chain {
		inter.AddCert(c)
	}
	if _, err := ca.cert.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: t, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return fmt.Errorf("CA certificate %q does not chain to the trust anchors: %w", ca.cert.Subject, err)
	}
	return nil
}

// Bundle returns the trust bundle: the root certificates.
func (ca *CA) Bundle() *x509bundle.Bundle { return ca.bundle.Clone() }

// TrustDomain returns the trust domain the CA issues for.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// Fetch issues a new X.509-SVID for id with a fresh ECDSA P-256 key.
func (ca *CA) Fetch(ctx context.Context, id identity.Identity) (*x509svid.SVID, *x509bundle.Bundle, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, fmt.Errorf("issue %s: %w", id, err)
	}
	if ca.nodeHas != nil && !ca.nodeHas(id) {
		return nil, nil, fmt.Errorf("issue %s: refused: no pod on this node has this identity", id)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: generate key: %w", id, err)
	}
	chain, err := ca.Issue(key.Public(), id, ca.ttl)
	if err != nil {
		return nil, nil, err
	}
	return &x509svid.SVID{ID: id.SPIFFEID(), Certificates: chain, PrivateKey: key}, ca.Bundle(), nil
}

// Issue signs a leaf for id over pub, valid for ttl (capped at the CA's own
// expiry), and returns it followed by the chain up to (not including) the root.
func (ca *CA) Issue(pub crypto.PublicKey, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("issue: %w", err)
	}
	if id.TrustDomain != ca.td {
		return nil, fmt.Errorf("issue %s: refused: the CA issues only for trust domain %s", id, ca.td)
	}
	now := ca.now()
	if err := ca.checkValid(now); err != nil {
		return nil, fmt.Errorf("issue %s: %w", id, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(ttl)
	for _, c := range append([]*x509.Certificate{ca.cert}, ca.chain...) {
		if c.NotAfter.Before(notAfter) {
			notAfter = c.NotAfter
		}
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		URIs:                  []*url.URL{id.SPIFFEID().URL()},
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issue %s: sign: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue %s: parse signed leaf: %w", id, err)
	}
	return append([]*x509.Certificate{leaf}, ca.chain...), nil
}

// IssueServer signs a TLS serving certificate over pub for the given DNS
// names and IP addresses (and, when uri is set, that URI SAN), valid for ttl
// capped at the CA's own expiry, and returns it followed by the chain up to
// (not including) the root. Clients verify it against Bundle like any leaf.
// The CA service (pkg/caserver) presents such a certificate.
func (ca *CA) IssueServer(pub crypto.PublicKey, dnsNames []string, ips []net.IP, uri *url.URL, ttl time.Duration) ([]*x509.Certificate, error) {
	if len(dnsNames) == 0 && len(ips) == 0 {
		return nil, errors.New("issue serving certificate: no DNS name or IP address to certify")
	}
	now := ca.now()
	if err := ca.checkValid(now); err != nil {
		return nil, fmt.Errorf("issue serving certificate for %v %v: %w", dnsNames, ips, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(ttl)
	for _, c := range append([]*x509.Certificate{ca.cert}, ca.chain...) {
		if c.NotAfter.Before(notAfter) {
			notAfter = c.NotAfter
		}
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"warren"}},
		DNSNames:              dnsNames,
		IPAddresses:           ips,
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if len(dnsNames) > 0 {
		tmpl.Subject.CommonName = dnsNames[0]
	}
	if uri != nil {
		tmpl.URIs = []*url.URL{uri}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issue serving certificate for %v %v: sign: %w", dnsNames, ips, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue serving certificate: parse signed certificate: %w", err)
	}
	return append([]*x509.Certificate{leaf}, ca.chain...), nil
}

func checkCATrustDomain(c *x509.Certificate, td spiffeid.TrustDomain) error {
	for _, u := range c.URIs {
		if u.Scheme != "spiffe" {
			continue
		}
		id, err := spiffeid.FromURI(u)
		if err != nil {
			return fmt.Errorf("%s: URI SAN %s: %w", CertFile, u, err)
		}
		if id.TrustDomain() != td {
			return fmt.Errorf("%s is for trust domain %s, configured trust domain is %s", CertFile, id.TrustDomain(), td)
		}
	}
	return nil
}

func parseCerts(name string, b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, c)
	}
	return out, nil
}

func parseKey(b []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, fmt.Errorf("%s: no private key", KeyFile)
		}
		var k any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", KeyFile, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: %T cannot sign", KeyFile, k)
		}
		return s, nil
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

func selfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generate serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}
