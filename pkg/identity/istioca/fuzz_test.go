package istioca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
)

// FuzzParseResponse feeds arbitrary certificate chains to the response
// parser: it must never panic, and whatever it accepts must be for the
// requested identity and key.
func FuzzParseResponse(f *testing.F) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id, _ := identity.New(td.Name(), "default", "web")
	certPEM, keyPEM, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: td})
	if err != nil {
		f.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: certPEM, builtinca.KeyFile: keyPEM}, builtinca.Options{TrustDomain: td})
	if err != nil {
		f.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := ca.Issue(key.Public(), id, 0)
	if err != nil {
		f.Fatal(err)
	}
	leafPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: chain[0].Raw}))
	f.Add(leafPEM, string(certPEM))
	f.Add(leafPEM+string(certPEM), "")
	f.Add("", "")
	f.Add("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "x")

	c := &Client{}
	f.Fuzz(func(t *testing.T, a, b string) {
		var elems []string
		for _, s := range []string{a, b} {
			if s != "" {
				elems = append(elems, s)
			}
		}
		svid, bundle, err := c.parseResponse(id, key, elems)
		if err != nil {
			if strings.TrimSpace(err.Error()) == "" {
				t.Fatal("empty error")
			}
			return
		}
		if svid.ID != id.SPIFFEID() || !key.PublicKey.Equal(svid.Certificates[0].PublicKey) {
			t.Fatalf("accepted a chain for %s / another key", svid.ID)
		}
		if bundle == nil || bundle.TrustDomain() != td || bundle.Empty() {
			t.Fatal("accepted without a bundle for the trust domain")
		}
	})
}
