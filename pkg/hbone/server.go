package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// ServerRequest is an authenticated HBONE CONNECT handed to a Handler.
type ServerRequest struct {
	// Peer is the client's SPIFFE ID, from its verified certificate.
	Peer spiffeid.ID
	// Authority is the requested destination (:authority).
	Authority netip.AddrPort
	// Headers are the request's regular headers (Forwarded, Baggage, Traceparent...).
	Headers http.Header
	// RemoteAddr and LocalAddr are the TCP addresses of the tunnel connection.
	RemoteAddr, LocalAddr netip.AddrPort
}

// Handler authorizes an HBONE request and connects to its upstream. It
// returns the upstream connection, which the server relays to and closes;
// or an error: ErrDenied (or one wrapping it) answers 401, a *StatusError
// its Code, anything else 503. ctx ends when the stream or connection ends.
type Handler interface {
	ServeHBONE(ctx context.Context, req *ServerRequest) (net.Conn, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *ServerRequest) (net.Conn, error)

// ServeHBONE calls f.
func (f HandlerFunc) ServeHBONE(ctx context.Context, req *ServerRequest) (net.Conn, error) {
	return f(ctx, req)
}

// Refusal is a reason the server refused a connection or a stream.
type Refusal int

// Refusal reasons, each counted in ServerStats.
const (
	RefusedHandshake   Refusal = iota // TLS handshake failed (bad or missing client certificate, TLS < 1.3, ...)
	RefusedALPN                       // no "h2" ALPN negotiated
	RefusedIdentity                   // no SPIFFE ID in the verified client certificate
	RefusedPreface                    // not an HTTP/2 client preface (HTTP/1.1, garbage)
	RefusedProtocol                   // HTTP/2 connection error
	RefusedStreamLimit                // stream beyond MaxStreamsPerConn (RST_STREAM REFUSED_STREAM)
	RefusedMalformed                  // 400 or 405
	RefusedHeaderSize                 // 431
	RefusedDenied                     // 401
	RefusedUpstream                   // 503 or another handler status
	numRefusals
)

var refusalNames = [numRefusals]string{"tls_handshake", "alpn", "identity", "preface", "protocol", "stream_limit", "malformed", "header_size", "denied", "upstream"}

func (r Refusal) String() string {
	if r >= 0 && r < numRefusals {
		return refusalNames[r]
	}
	return "refusal(" + strconv.Itoa(int(r)) + ")"
}

// ServerMetrics receives server events; implementations must be safe for
// concurrent use and fast.
type ServerMetrics interface {
	Refused(Refusal)
}

// ServerStats is a snapshot of a server's counters.
type ServerStats struct {
	// Conns counts connections that completed TLS and the HTTP/2 preface.
	Conns uint64
	// Streams counts CONNECT requests answered 200.
	Streams uint64
	// Refused counts refusals by reason.
	Refused map[Refusal]uint64
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// TLS must require and verify client certificates (see ServerTLSConfig).
	// The server forces TLS 1.3, ALPN h2 and AES-GCM on a clone of it, and
	// on what GetConfigForClient returns.
	TLS *tls.Config
	// Handler serves authenticated requests.
	Handler Handler
	// Params tunes HTTP/2 and timeouts; zero fields take defaults.
	Params Params
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Metrics is optional.
	Metrics ServerMetrics
}

// Server accepts HBONE connections.
type Server struct {
	tls     *tls.Config
	handler Handler
	p       Params
	log     *slog.Logger
	metrics ServerMetrics

	conns, streams atomic.Uint64
	refused        [numRefusals]atomic.Uint64

	mu        sync.Mutex
	live      map[*conn]struct{}
	listeners map[net.Listener]struct{}
	closed    bool
	wg        sync.WaitGroup
}

// NewServer checks the configuration and returns a server.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Handler == nil {
		return nil, errors.New("hbone server: nil handler")
	}
	if cfg.TLS == nil {
		return nil, errors.New("hbone server: nil TLS config")
	}
	if cfg.TLS.GetConfigForClient == nil && cfg.TLS.ClientAuth < tls.RequireAnyClientCert {
		return nil, errors.New("hbone server: TLS config must require client certificates")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Server{
		tls:       hardenServer(cfg.TLS),
		handler:   cfg.Handler,
		p:         cfg.Params.withDefaults(),
		log:       log,
		metrics:   cfg.Metrics,
		live:      make(map[*conn]struct{}),
		listeners: make(map[net.Listener]struct{}),
	}, nil
}

// Stats returns a snapshot of the counters.
func (srv *Server) Stats() ServerStats {
	st := ServerStats{Conns: srv.conns.Load(), Streams: srv.streams.Load(), Refused: make(map[Refusal]uint64)}
	for i := range srv.refused {
		if n := srv.refused[i].Load(); n > 0 {
			st.Refused[Refusal(i)] = n
		}
	}
	return st
}

func (srv *Server) refuse(r Refusal) {
	srv.refused[r].Add(1)
	if srv.metrics != nil {
		srv.metrics.Refused(r)
	}
}

// Serve accepts connections on ln until it is closed or the server shuts
// down; a refused connection never stops it.
func (srv *Server) Serve(ln net.Listener) error {
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		return net.ErrClosed
	}
	srv.listeners[ln] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.listeners, ln)
		srv.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			srv.mu.Lock()
			closed := srv.closed
			srv.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors and the like: back off, keep serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			srv.log.Warn("hbone: accept", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		srv.wg.Add(1)
		go func() {
			defer srv.wg.Done()
			srv.ServeConn(nc)
		}()
	}
}

// ServeConn runs the HBONE server side of an accepted TCP connection and
// returns when the connection has ended.
func (srv *Server) ServeConn(nc net.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), srv.p.HandshakeTimeout)
	defer cancel()
	tc := tls.Server(&batchConn{Conn: nc}, srv.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		srv.refuse(RefusedHandshake)
		srv.log.Debug("hbone: tls handshake", "remote", nc.RemoteAddr(), "err", err)
		nc.Close()
		return
	}
	st := tc.ConnectionState()
	if st.NegotiatedProtocol != http2.NextProtoTLS {
		srv.refuse(RefusedALPN)
		tc.Close()
		return
	}
	if len(st.PeerCertificates) == 0 {
		srv.refuse(RefusedIdentity)
		tc.Close()
		return
	}
	peer, err := x509svid.IDFromCert(st.PeerCertificates[0])
	if err != nil {
		srv.refuse(RefusedIdentity)
		tc.Close()
		return
	}
	_ = tc.SetReadDeadline(time.Now().Add(srv.p.HandshakeTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(tc, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		srv.refuse(RefusedPreface)
		srv.log.Debug("hbone: bad preface", "remote", nc.RemoteAddr(), "peer", peer, "err", err)
		if err == nil && bytes.HasPrefix(preface[:], []byte("CONNECT ")) {
			_, _ = io.WriteString(tc, "HTTP/1.1 505 HTTP Version Not Supported\r\nConnection: close\r\n\r\n")
		}
		tc.Close()
		return
	}
	_ = tc.SetReadDeadline(time.Time{})

	c := newConn(tc, serverRole, srv.p, srv.log)
	remote := addrPort(nc.RemoteAddr())
	local := addrPort(nc.LocalAddr())
	c.onRefuse = srv.refuse
	c.onRequest = func(s *Stream, fields []hpack.HeaderField, truncated bool) {
		srv.serveStream(s, peer, remote, local, fields, truncated)
	}
	done := make(chan struct{})
	c.onClose = func(c *conn) {
		srv.mu.Lock()
		delete(srv.live, c)
		srv.mu.Unlock()
		close(done)
	}
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		tc.Close()
		return
	}
	srv.live[c] = struct{}{}
	srv.mu.Unlock()
	if err := c.start(); err != nil {
		<-done
		return
	}
	srv.conns.Add(1)
	<-done
}

func (srv *Server) serveStream(s *Stream, peer spiffeid.ID, remote, local netip.AddrPort, fields []hpack.HeaderField, truncated bool) {
	if truncated {
		srv.refuse(RefusedHeaderSize)
		s.respondAndEnd(http.StatusRequestHeaderFieldsTooLarge)
		return
	}
	cr, err := ValidateConnect(fields)
	if err != nil {
		srv.refuse(RefusedMalformed)
		srv.log.Debug("hbone: malformed CONNECT", "peer", peer, "remote", remote, "err", err)
		s.respondAndEnd(statusOf(err))
		return
	}
	req := &ServerRequest{Peer: peer, Authority: cr.Authority, Headers: cr.Headers, RemoteAddr: remote, LocalAddr: local}
	up, err := srv.handler.ServeHBONE(s.ctx, req)
	if err != nil {
		code := statusOf(err)
		if code == http.StatusUnauthorized {
			srv.refuse(RefusedDenied)
		} else {
			srv.refuse(RefusedUpstream)
		}
		srv.log.Debug("hbone: CONNECT refused", "peer", peer, "authority", cr.Authority, "status", code, "err", err)
		s.respondAndEnd(code)
		return
	}
	if err := s.respond(http.StatusOK, false); err != nil {
		up.Close()
		s.Abort()
		return
	}
	srv.streams.Add(1)
	Relay(s, up)
}

// statusOf maps a handler or validation error to an HTTP status.
func statusOf(err error) int {
	var se *StatusError
	switch {
	case errors.As(err, &se) && se.Code >= 200 && se.Code <= 999:
		return se.Code
	case errors.Is(err, ErrDenied):
		return http.StatusUnauthorized
	default:
		return http.StatusServiceUnavailable
	}
}

// respond writes the response HEADERS.
func (s *Stream) respond(status int, endStream bool) error {
	c := s.c
	c.mu.Lock()
	maxFrame := int(c.peerMaxFrame)
	tableSize := c.peerTableSize
	err := s.resetErr
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.writeMu.Lock()
	if s.rstSent || s.endSent {
		c.writeMu.Unlock()
		return io.ErrClosedPipe
	}
	c.startHeaderBlock(tableSize)
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	err = c.writeHeaderBlock(s.id, endStream, c.hbuf.Bytes(), maxFrame)
	if endStream {
		s.endSent = true
	}
	c.writeMu.Unlock()
	if err != nil {
		c.fail(err)
		return err
	}
	if endStream {
		c.mu.Lock()
		s.wclosed = true
		if s.rclosed {
			c.removeStreamLocked(s)
		}
		c.mu.Unlock()
	}
	return nil
}

// respondAndEnd answers with status and ends the stream; a client still
// sending is told to stop with RST_STREAM NO_ERROR (RFC 9113 8.1).
func (s *Stream) respondAndEnd(status int) {
	if err := s.respond(status, true); err != nil {
		return
	}
	s.c.mu.Lock()
	done := s.removed
	s.c.mu.Unlock()
	if !done {
		s.reset(http2.ErrCodeNo)
	}
}

// GoAway sends GOAWAY on every current connection: their open streams
// finish, new streams go to new connections. The server keeps accepting.
func (srv *Server) GoAway() {
	srv.mu.Lock()
	conns := make([]*conn, 0, len(srv.live))
	for c := range srv.live {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	for _, c := range conns {
		c.drain()
	}
}

// Shutdown stops accepting, drains every connection with GOAWAY and waits
// for them to end or ctx to expire, then closes what is left.
func (srv *Server) Shutdown(ctx context.Context) error {
	srv.mu.Lock()
	srv.closed = true
	for ln := range srv.listeners {
		ln.Close()
	}
	srv.mu.Unlock()
	srv.GoAway()
	done := make(chan struct{})
	go func() {
		srv.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		srv.Close()
		<-done
		return fmt.Errorf("hbone server shutdown: %w", ctx.Err())
	}
}

// Close stops accepting and closes every connection at once.
func (srv *Server) Close() error {
	srv.mu.Lock()
	srv.closed = true
	for ln := range srv.listeners {
		ln.Close()
	}
	conns := make([]*conn, 0, len(srv.live))
	for c := range srv.live {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	for _, c := range conns {
		c.fail(errors.New("server closed"))
	}
	return nil
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
