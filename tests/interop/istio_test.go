package interop

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	istiohbone "istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"

	"github.com/warren-mesh/warren/pkg/hbone"
)

func TestMain(m *testing.M) {
	// Istio's hbone scope logs every stream at info level.
	if s := istiolog.FindScope("hbone"); s != nil {
		s.SetOutputLevel(istiolog.WarnLevel)
	}
	os.Exit(m.Run())
}

// startIstioServer serves Istio's Go HBONE server with the PKI's server
// identity, requiring client certificates from the trust domain.
func startIstioServer(t testing.TB, p *pki) string {
	return startIstioServerWith(t, p, nil)
}

// startIstioServerWith is startIstioServer with Istio's handler wrapped by
// wrap (nil: as is).
func startIstioServerWith(t testing.TB, p *pki, wrap func(http.Handler) http.Handler) string {
	cfg := tlsconfig.MTLSServerConfig(p.server, p.ca.Bundle(), tlsconfig.AuthorizeMemberOf(p.ca.TrustDomain()))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{"h2"}
	srv := istiohbone.NewServer()
	srv.Protocols.SetHTTP2(true)
	if wrap != nil {
		srv.Handler = wrap(srv.Handler)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(tls.NewListener(ln, cfg))
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// istioDialer is Istio's Go HBONE client with the PKI's client identity.
func istioDialer(p *pki, proxy string) istiohbone.Dialer {
	cfg := tlsconfig.MTLSClientConfig(p.client, p.ca.Bundle(), tlsconfig.AuthorizeID(p.server.ID))
	cfg.MinVersion = tls.VersionTLS13
	cfg.NextProtos = []string{"h2"}
	return istiohbone.NewDialer(istiohbone.Config{ProxyAddress: proxy, TLS: cfg})
}

func TestWarrenClientIstioServer(t *testing.T) {
	p := newPKI(t)
	echo := startEcho(t)
	addr := startIstioServer(t, p)
	pool, err := hbone.NewPool(hbone.PoolConfig{TLS: p.clientTLS(), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	req := hbone.Request{
		Source:    p.client.ID,
		Expected:  []spiffeid.ID{p.server.ID},
		Addr:      mustAddrPort(addr),
		Authority: echo,
	}
	concurrently(t, streams, func(i int) error {
		ctx, cancel := dialCtx()
		defer cancel()
		s, err := pool.Dial(ctx, req)
		if err != nil {
			return fmt.Errorf("stream %d: dial: %w", i, err)
		}
		defer s.Close()
		if err := checkEcho(s, 128<<10+i*1031, true); err != nil {
			return fmt.Errorf("stream %d: %w", i, err)
		}
		return nil
	})
	if st := pool.Stats(); st.ConnsOpened != 1 || st.Streams != streams {
		t.Errorf("pool stats %+v: want 1 connection and %d streams", st, streams)
	}
}

func TestIstioClientWarrenServer(t *testing.T) {
	p := newPKI(t)
	echo := startEcho(t)
	srv, addr := startWarrenServer(t, p)
	d := istioDialer(p, addr)
	concurrently(t, streams, func(i int) error {
		c, err := d.Dial("tcp", echo.String())
		if err != nil {
			return fmt.Errorf("stream %d: dial: %w", i, err)
		}
		defer c.Close()
		// Istio's client returns a net.Pipe without half-close: read the echo back by length.
		if err := checkEcho(c, 128<<10+i*1031, false); err != nil {
			return fmt.Errorf("stream %d: %w", i, err)
		}
		return nil
	})
	st := srv.Stats()
	if st.Streams != streams || len(st.Refused) != 0 {
		t.Errorf("server stats %+v: want %d streams and no refusal", st, streams)
	}
}

func TestIstioClientSeesWarrenStatuses(t *testing.T) {
	p := newPKI(t)
	echo := startEcho(t)
	_, addr := startWarrenServerWith(t, p, hbone.HandlerFunc(func(ctx context.Context, r *hbone.ServerRequest) (net.Conn, error) {
		if r.Authority.Port() == 1 {
			return nil, hbone.ErrDenied
		}
		return (&net.Dialer{}).DialContext(ctx, "tcp", r.Authority.String())
	}))
	d := istioDialer(p, addr)
	tests := []struct {
		authority string
		want      string
	}{
		{"127.0.0.1:1", "401"},
		{"127.0.0.2:" + strconv.Itoa(int(echo.Port())), "503"}, // nothing listens there
	}
	for _, tt := range tests {
		_, err := d.Dial("tcp", tt.authority)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Istio client CONNECT %s: %v, want status %s", tt.authority, err, tt.want)
		}
	}
	// And a good one still works on the same dialer.
	c, err := d.Dial("tcp", echo.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := checkEcho(c, 1000, false); err != nil {
		t.Fatal(err)
	}
}
