package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Provider issues X.509-SVIDs. Implementations: builtinca, spire, istioca.
type Provider interface {
	// Fetch returns a fresh X.509-SVID for id (leaf first, then any
	// intermediates, with its private key) and the trust bundle of id's
	// trust domain. The Manager checks the result before using it.
	Fetch(ctx context.Context, id Identity) (*x509svid.SVID, *x509bundle.Bundle, error)
}

// ProviderFunc adapts a function to the Provider interface.
type ProviderFunc func(ctx context.Context, id Identity) (*x509svid.SVID, *x509bundle.Bundle, error)

// Fetch calls f.
func (f ProviderFunc) Fetch(ctx context.Context, id Identity) (*x509svid.SVID, *x509bundle.Bundle, error) {
	return f(ctx, id)
}

// CheckSVID reports why svid is not a usable certificate for id at time now,
// or nil when it is: the leaf's only URI SAN must be id, its key ECDSA P-256
// matching the private key, and the chain must verify against bundle, which
// must belong to id's trust domain. Providers may call it; the Manager always does.
func CheckSVID(id Identity, svid *x509svid.SVID, bundle *x509bundle.Bundle, now time.Time) error {
	switch {
	case svid == nil || len(svid.Certificates) == 0:
		return errors.New("no certificate in response")
	case svid.PrivateKey == nil:
		return errors.New("no private key in response")
	case bundle == nil || bundle.Empty():
		return fmt.Errorf("no trust bundle for trust domain %s in response", id.TrustDomain)
	case bundle.TrustDomain() != id.TrustDomain:
		return fmt.Errorf("trust bundle is for trust domain %s, want %s", bundle.TrustDomain(), id.TrustDomain)
	}
	leaf := svid.Certificates[0]
	got, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return fmt.Errorf("leaf certificate (serial %x): %w", leaf.SerialNumber, err)
	}
	if got != id.SPIFFEID() {
		return fmt.Errorf("leaf certificate is for %s, requested %s", got, id)
	}
	if svid.ID != got {
		return fmt.Errorf("svid claims %s but its leaf certificate is for %s", svid.ID, got)
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return fmt.Errorf("leaf key is %s, want ECDSA P-256", keyName(leaf))
	}
	priv, ok := svid.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || !priv.PublicKey.Equal(pub) {
		return errors.New("private key does not match the leaf certificate")
	}
	if now.Before(leaf.NotBefore) || !now.Before(leaf.NotAfter) {
		return fmt.Errorf("leaf certificate valid from %s to %s, not at %s",
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle, x509svid.WithTime(now)); err != nil {
		return fmt.Errorf("verify chain against the trust bundle of %s: %w", id.TrustDomain, err)
	}
	return nil
}

func keyName(c *x509.Certificate) string {
	switch k := c.PublicKey.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	default:
		return c.PublicKeyAlgorithm.String()
	}
}
