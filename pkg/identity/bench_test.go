package identity_test

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/internal/fakeclock"
)

// BenchmarkClientCertificate measures the certificate lookup each HBONE
// handshake makes (GetClientCertificate), from many goroutines at once.
func BenchmarkClientCertificate(b *testing.B) {
	clk := fakeclock.New(start)
	m := newManager(b, newScripted(newCA(b, clk.Now, 24*time.Hour)), clk)
	id := mustID(b, "default", "web")
	if err := m.Acquire(b.Context(), id); err != nil {
		b.Fatal(err)
	}
	cfg, err := m.ClientConfig(id.SPIFFEID(), []spiffeid.ID{id.SPIFFEID()})
	if err != nil {
		b.Fatal(err)
	}
	cri := &tls.CertificateRequestInfo{}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := cfg.GetClientCertificate(cri); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkHandshake measures one HBONE mTLS handshake (TLS 1.3, ECDSA
// P-256 both ways, SPIFFE verification both ways) over an in-memory pipe.
func BenchmarkHandshake(b *testing.B) {
	clk := fakeclock.New(start)
	m := newManager(b, newScripted(newCA(b, clk.Now, 24*time.Hour)), clk)
	web, db := mustID(b, "default", "web"), mustID(b, "prod", "db")
	for _, id := range []identity.Identity{web, db} {
		if err := m.Acquire(b.Context(), id); err != nil {
			b.Fatal(err)
		}
	}
	ccfg, _ := m.ClientConfig(web.SPIFFEID(), []spiffeid.ID{db.SPIFFEID()})
	scfg, _ := m.ServerConfig(identity.StaticServerIdentity(db.SPIFFEID()))
	b.ReportAllocs()
	for b.Loop() {
		a, z := net.Pipe()
		errc := make(chan error, 1)
		go func() { errc <- tls.Server(z, scfg).Handshake() }()
		if err := tls.Client(a, ccfg).Handshake(); err != nil {
			b.Fatal(err)
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
		a.Close()
		z.Close()
	}
}
