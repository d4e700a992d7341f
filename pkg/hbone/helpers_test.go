package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/internal/testpki"
)

const testTD = "cluster.local"

// env is a CA, an HBONE server on loopback relaying to a local echo
// server, and the identities of a client and the server.
type env struct {
	ca         *testpki.CA
	client     *testpki.SVID
	serverSVID *testpki.SVID
	srv        *Server
	addr       netip.AddrPort // HBONE listener
	echo       netip.AddrPort // upstream echo server

	mu       sync.Mutex
	requests []*ServerRequest
}

type envOpts struct {
	params  Params
	handler Handler
	tlsCfg  func(*tls.Config)
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func newEnv(t testing.TB, o envOpts) *env {
	t.Helper()
	e := &env{ca: testpki.NewCA(t, testTD)}
	e.client = e.ca.IssueWorkload(t, "client-ns", "client-sa")
	e.serverSVID = e.ca.IssueWorkload(t, "server-ns", "server-sa")
	e.echo = startEcho(t)

	h := o.handler
	if h == nil {
		h = HandlerFunc(func(ctx context.Context, r *ServerRequest) (net.Conn, error) {
			e.mu.Lock()
			e.requests = append(e.requests, r)
			e.mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, "tcp", r.Authority.String())
		})
	}
	cfg := ServerTLSConfig(e.serverSVID.X509, e.ca.Bundle(), e.ca.TrustDomain())
	if o.tlsCfg != nil {
		o.tlsCfg(cfg)
	}
	srv, err := NewServer(ServerConfig{TLS: cfg, Handler: h, Params: o.params, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	e.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return e
}

func (e *env) pool(t testing.TB, params Params) *Pool {
	t.Helper()
	p, err := NewPool(PoolConfig{TLS: e.clientTLS(e.client), Params: params, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func (e *env) clientTLS(svids ...*testpki.SVID) ClientTLS {
	return SPIFFEClientTLS{
		SVID: func(src spiffeid.ID) (x509svid.Source, error) {
			for _, s := range svids {
				if s.ID == src {
					return s, nil
				}
			}
			return nil, errors.New("unknown identity")
		},
		Bundles: e.ca.Bundle(),
	}
}

func (e *env) request() Request {
	return Request{
		Source:    e.client.ID,
		Expected:  []spiffeid.ID{e.serverSVID.ID},
		Addr:      e.addr,
		Authority: e.echo,
		Headers: http.Header{
			"Forwarded":   {`for="198.18.0.1:4242"`},
			"Baggage":     {"k8s.namespace.name=client-ns"},
			"Traceparent": {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
		},
	}
}

// startEcho runs a TCP echo server that half-closes after its input ends.
func startEcho(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				buf := make([]byte, 64<<10)
				_, _ = io.CopyBuffer(c, c, buf)
				_ = c.(*net.TCPConn).CloseWrite()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func dial(t testing.TB, p *Pool, r Request) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := p.Dial(ctx, r)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	return s
}

// eventually polls cond until it holds or the timeout ends.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
