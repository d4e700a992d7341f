package interop

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/warren-mesh/warren/pkg/hbone"
)

func mustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// startWarrenServer serves warren's HBONE server on loopback, relaying to
// whatever authority is asked.
func startWarrenServer(t testing.TB, p *pki) (*hbone.Server, string) {
	return startWarrenServerWith(t, p, hbone.HandlerFunc(func(ctx context.Context, r *hbone.ServerRequest) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", r.Authority.String())
	}))
}

func startWarrenServerWith(t testing.TB, p *pki, h hbone.Handler) (*hbone.Server, string) {
	srv, err := hbone.NewServer(hbone.ServerConfig{
		TLS:     hbone.ServerTLSConfig(p.server, p.ca.Bundle(), p.ca.TrustDomain()),
		Handler: h,
		Logger:  quiet(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return srv, ln.Addr().String()
}
