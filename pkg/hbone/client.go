package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Pool invariants (after ztunnel's src/proxy/pool.rs):
//
//   - Connections are keyed by (source identity, expected destination
//     identities as a set, destination address, source IP); a key may hold
//     several connections.
//   - A Dial takes a slot on the least-loaded connection of its key that is
//     alive, has not received GOAWAY and carries fewer than MaxStreamsPerConn
//     (and the server's SETTINGS_MAX_CONCURRENT_STREAMS) streams — as long
//     as that connection carries no stream yet, or the key already has
//     PoolConfig.ConnsPerPeer connections (dials in progress included).
//     Otherwise it dials one more connection of the key and waits for it (or
//     waits for a dial in progress when the key is at ConnsPerPeer and every
//     connection is full). So concurrent streams to one peer spread over up
//     to ConnsPerPeer TCP connections and TLS sessions — each with its own
//     read loop and write lock, so they can run on different CPUs — and
//     share them beyond that; with ConnsPerPeer 1 concurrent Dials share one
//     connection and handshake, and a key opens a new connection only when
//     its connections are full or draining.
//   - The dial runs detached from any one caller's context (bounded by
//     HandshakeTimeout): a caller giving up does not fail the others.
//   - A connection leaves the pool when it dies: idle timeout, GOAWAY with no
//     streams left, PING timeout, I/O error, Pool.Close.
//   - A CONNECT the server never processed (refused, above a GOAWAY's last
//     stream, or its connection lost before any response) is sent again, up
//     to ConnsPerPeer+2 attempts: a peer handing over drains each of the
//     key's connections in turn (TestGoAwayOnEverySpreadConnection).

// Request describes one tunnel to open.
type Request struct {
	// Source is the local workload identity presented to the server.
	Source spiffeid.ID
	// Expected are the identities the server may present (the destination
	// workload's, plus the service's subject alt names).
	Expected []spiffeid.ID
	// Addr is the HBONE endpoint, usually the destination pod IP and 15008.
	Addr netip.AddrPort
	// SourceIP is the local address tunnels leave from; optional, part of
	// the pool key and available to DialContext via DialRequest.
	SourceIP netip.Addr
	// Authority is the destination workload address (CONNECT :authority).
	Authority netip.AddrPort
	// Headers are sent with the CONNECT (forwarded, baggage, traceparent).
	Headers http.Header
}

type poolKey struct {
	src      spiffeid.ID
	expected string
	addr     netip.AddrPort
	srcIP    netip.Addr
}

func keyOf(r *Request) poolKey {
	ids := make([]string, len(r.Expected))
	for i, id := range r.Expected {
		ids[i] = id.String()
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	return poolKey{src: r.Source, expected: strings.Join(ids, "\x00"), addr: r.Addr, srcIP: r.SourceIP}
}

// PoolConfig configures a Pool.
type PoolConfig struct {
	// TLS supplies per-identity client configurations. Required.
	TLS ClientTLS
	// DialContext opens the TCP connection (the node agent dials from the
	// source pod's network namespace with SO_MARK set). Defaults to a
	// net.Dialer. DialRequest(ctx) returns the Request that caused the dial.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Params tunes HTTP/2 and timeouts; zero fields take defaults.
	Params Params
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Metrics is optional.
	Metrics PoolMetrics
	// ConnsPerPeer is how many connections of one pool key (source
	// identity, expected identities, peer address) concurrent streams are
	// spread over before they share them; 0 or 1 means one shared
	// connection. Connections still close when idle (Params.IdleTimeout).
	ConnsPerPeer int
}

// PoolMetrics receives pool events; implementations must be safe for
// concurrent use and fast.
type PoolMetrics interface {
	ConnOpened()
	ConnClosed()
	DialFailed(err error)
}

// PoolStats is a snapshot of a pool's counters.
type PoolStats struct {
	// Conns is the number of live connections.
	Conns int
	// ConnsOpened counts connections that completed the handshake.
	ConnsOpened uint64
	// DialErrors counts failed connection attempts (TCP, TLS, preface).
	DialErrors uint64
	// Streams counts tunnels opened (answered 200).
	Streams uint64
	// StreamErrors counts CONNECTs refused or failed after a connection was found.
	StreamErrors uint64
}

// Pool opens HBONE tunnels over pooled HTTP/2 connections. It is safe for
// concurrent use.
type Pool struct {
	cfg  PoolConfig
	p    Params
	log  *slog.Logger
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	opened, dialErrors, streams, streamErrors atomic.Uint64

	mu     sync.Mutex
	keys   map[poolKey]*keyConns
	closed bool
}

type keyConns struct {
	conns   []*conn
	dialing []*dialCall // in progress, oldest first
}

type dialCall struct {
	done   chan struct{}
	c      *conn
	err    error
	claims int // Dials waiting for this connection (under Pool.mu)
}

// NewPool returns an empty pool.
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.TLS == nil {
		return nil, errors.New("hbone pool: nil ClientTLS")
	}
	p := &Pool{cfg: cfg, p: cfg.Params.withDefaults(), log: cfg.Logger, dial: cfg.DialContext, keys: make(map[poolKey]*keyConns)}
	if p.log == nil {
		p.log = slog.Default()
	}
	if p.dial == nil {
		p.dial = dialFrom
	}
	return p, nil
}

// dialFrom is the default dialer: it binds the Request's SourceIP if set.
func dialFrom(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	if r, ok := DialRequest(ctx); ok && r.SourceIP.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: r.SourceIP.AsSlice()}
	}
	return d.DialContext(ctx, network, addr)
}

type dialRequestKey struct{}

// DialRequest returns the Request that caused a PoolConfig.DialContext call.
func DialRequest(ctx context.Context) (Request, bool) {
	r, ok := ctx.Value(dialRequestKey{}).(*Request)
	if !ok {
		return Request{}, false
	}
	return *r, true
}

// Dial opens a tunnel to req.Authority through req.Addr. It returns a
// *StatusError when the server answered other than 200.
func (p *Pool) Dial(ctx context.Context, req Request) (*Stream, error) {
	if len(req.Expected) == 0 {
		return nil, errors.New("hbone dial: no expected server identity")
	}
	if !req.Addr.IsValid() || !req.Authority.IsValid() {
		return nil, fmt.Errorf("hbone dial: invalid address %s or authority %s", req.Addr, req.Authority)
	}
	key := keyOf(&req)
	// A CONNECT the peer never processed is retried. Each retry lands on a
	// connection not yet known to be draining (a failed one never takes a
	// stream again), and a peer that hands over or shuts down drains every
	// connection we have with it, one after another: the budget covers one
	// failure on each of the ConnsPerPeer connections, then a fresh one.
	attempts := max(p.cfg.ConnsPerPeer, 1) + 2
	var lastErr error
	for range attempts {
		c, err := p.getConn(ctx, key, &req)
		if err != nil {
			return nil, err
		}
		s, err := c.roundTrip(ctx, &req)
		if err == nil {
			p.streams.Add(1)
			return s, nil
		}
		lastErr = err
		if !retryable(err) || ctx.Err() != nil {
			break
		}
	}
	p.streamErrors.Add(1)
	return nil, fmt.Errorf("hbone connect %s via %s: %w", req.Authority, req.Addr, lastErr)
}

// getConn returns a connection with a reserved stream slot.
func (p *Pool) getConn(ctx context.Context, key poolKey, req *Request) (*conn, error) {
	spread := max(p.cfg.ConnsPerPeer, 1)
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		kc := p.keys[key]
		if kc == nil {
			kc = &keyConns{}
			p.keys[key] = kc
		}
		// The least-loaded connection that can take a stream now.
		var best *conn
		bestN := 0
		for _, c := range kc.conns {
			if n, ok := c.load(); ok && (best == nil || n < bestN) {
				best, bestN = c, n
			}
		}
		atSpread := len(kc.conns)+len(kc.dialing) >= spread
		// The dial in progress the fewest Dials wait for.
		var next *dialCall
		for _, d := range kc.dialing {
			if next == nil || d.claims < next.claims {
				next = d
			}
		}
		// A dial in progress within the ConnsPerPeer budget is worth waiting
		// for when fewer streams will share it than the best open one.
		waitable := next != nil && len(kc.conns) < spread
		var dc *dialCall
		own := false
		switch {
		case best != nil && (bestN == 0 || atSpread && (!waitable || bestN <= next.claims)):
			if best.tryReserve() {
				p.mu.Unlock()
				return best, nil
			}
			// Lost the slot to a concurrent Dial: look again.
		case atSpread && next != nil && (best == nil || waitable):
			// Every connection full, or at ConnsPerPeer with a connection
			// on its way: wait for the least-claimed one in progress.
			next.claims++
			dc = next
		default:
			// Below ConnsPerPeer (or every connection full): one more.
			dc = &dialCall{done: make(chan struct{}), claims: 1}
			kc.dialing = append(kc.dialing, dc)
			own = true
			go p.dialConn(key, kc, dc, *req)
		}
		p.mu.Unlock()
		if dc == nil {
			continue
		}
		select {
		case <-dc.done:
			if dc.err != nil {
				return nil, dc.err
			}
			if dc.c.tryReserve() {
				return dc.c, nil
			}
			if own && !dc.c.mayCarryStreams() {
				return nil, fmt.Errorf("hbone dial %s: new connection takes no streams (GOAWAY, closed or a stream limit of 0)", req.Addr)
			}
			// Full already: other waiters took its slots; look again.
		case <-ctx.Done():
			return nil, fmt.Errorf("hbone dial %s: %w", req.Addr, ctx.Err())
		}
	}
}

func (p *Pool) dialConn(key poolKey, kc *keyConns, dc *dialCall, req Request) {
	c, err := p.newConn(&req)
	p.mu.Lock()
	if i := slices.Index(kc.dialing, dc); i >= 0 {
		kc.dialing = slices.Delete(kc.dialing, i, i+1)
	}
	if err == nil {
		if p.closed {
			err = ErrPoolClosed
		} else {
			kc.conns = append(kc.conns, c)
			c.onClose = func(c *conn) { p.remove(key, c) }
		}
	}
	if err != nil && len(kc.conns) == 0 && len(kc.dialing) == 0 && p.keys[key] == kc {
		delete(p.keys, key)
	}
	dc.c, dc.err = c, err
	p.mu.Unlock()
	if err != nil {
		p.dialErrors.Add(1)
		if p.cfg.Metrics != nil {
			p.cfg.Metrics.DialFailed(err)
		}
		if c != nil {
			c.fail(err)
		}
		close(dc.done)
		return
	}
	close(dc.done)
	// The connection may have died before onClose was set.
	select {
	case <-c.done:
		p.remove(key, c)
	default:
	}
}

func (p *Pool) newConn(req *Request) (*conn, error) {
	ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), dialRequestKey{}, req), p.p.HandshakeTimeout)
	defer cancel()
	addr := req.Addr.String()
	cfg, err := p.cfg.TLS.ClientConfig(req.Source, req.Expected)
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: tls config: %w", addr, err)
	}
	cfg = harden(cfg)
	raw, err := p.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: %w (is a network policy blocking port %d?)", addr, err, req.Addr.Port())
	}
	tc := tls.Client(&batchConn{Conn: raw}, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone dial %s: tls handshake: %w", addr, err)
	}
	if np := tc.ConnectionState().NegotiatedProtocol; np != http2.NextProtoTLS {
		tc.Close()
		return nil, fmt.Errorf("hbone dial %s: server negotiated ALPN %q, want h2", addr, np)
	}
	c := newConn(tc, clientRole, p.p, p.log)
	if err := c.start(); err != nil {
		return nil, fmt.Errorf("hbone dial %s: %w", addr, err)
	}
	if err := c.waitSettings(ctx); err != nil {
		c.fail(err)
		return nil, fmt.Errorf("hbone dial %s: %w", addr, err)
	}
	p.opened.Add(1)
	if p.cfg.Metrics != nil {
		p.cfg.Metrics.ConnOpened()
	}
	return c, nil
}

func (p *Pool) remove(key poolKey, c *conn) {
	p.mu.Lock()
	kc := p.keys[key]
	found := false
	if kc != nil {
		if i := slices.Index(kc.conns, c); i >= 0 {
			kc.conns = slices.Delete(kc.conns, i, i+1)
			found = true
		}
		if len(kc.conns) == 0 && len(kc.dialing) == 0 {
			delete(p.keys, key)
		}
	}
	p.mu.Unlock()
	if found && p.cfg.Metrics != nil {
		p.cfg.Metrics.ConnClosed()
	}
}

// Stats returns a snapshot of the counters.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	n := 0
	for _, kc := range p.keys {
		n += len(kc.conns)
	}
	p.mu.Unlock()
	return PoolStats{Conns: n, ConnsOpened: p.opened.Load(), DialErrors: p.dialErrors.Load(), Streams: p.streams.Load(), StreamErrors: p.streamErrors.Load()}
}

// Close closes every connection (open streams fail) and refuses new Dials.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	var conns []*conn
	for _, kc := range p.keys {
		conns = append(conns, kc.conns...)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.goAwayAndClose(http2.ErrCodeNo, ErrPoolClosed)
	}
	return nil
}

// roundTrip sends the CONNECT on a reserved slot and waits for the answer.
func (c *conn) roundTrip(ctx context.Context, req *Request) (*Stream, error) {
	c.writeMu.Lock()
	c.mu.Lock()
	c.reserved--
	if c.err != nil || c.goAway || c.draining {
		c.becameIdleLocked()
		c.mu.Unlock()
		c.writeMu.Unlock()
		return nil, errNotSent
	}
	s := c.newStreamLocked(c.nextID)
	c.nextID += 2
	s.respc = make(chan struct{})
	c.addStreamLocked(s)
	maxFrame := int(c.peerMaxFrame)
	tableSize := c.peerTableSize
	c.mu.Unlock()

	c.startHeaderBlock(tableSize)
	c.encodeRequest(req)
	err := c.writeHeaderBlock(s.id, false, c.hbuf.Bytes(), maxFrame)
	c.writeMu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("write headers: %w", err))
		return nil, errNotSent
	}

	select {
	case <-s.respc:
	case <-ctx.Done():
		s.Abort()
		return nil, ctx.Err()
	}
	c.mu.Lock()
	status, rerr := s.status, s.resetErr
	c.mu.Unlock()
	if !s.gotResponseSafe() {
		s.Abort()
		if errors.Is(rerr, ErrConnClosed) {
			// The connection died before any answer (typically a peer that
			// sent GOAWAY and closed while this CONNECT was in flight, as an
			// agent hands over to its successor). No byte of the tunnel was
			// relayed and the peer's side of the stream died with its
			// connection, so the CONNECT is safe to send again.
			return nil, fmt.Errorf("%w: %w", errLostBeforeResponse, rerr)
		}
		return nil, rerr
	}
	if status != http.StatusOK {
		s.Close()
		return nil, &StatusError{Code: status}
	}
	return s, nil
}

func (s *Stream) gotResponseSafe() bool {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.gotResponse
}

// encodeRequest HPACK-encodes the CONNECT into c.hbuf; writeMu held.
func (c *conn) encodeRequest(req *Request) {
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: req.Authority.String()})
	for k, vs := range req.Headers {
		name := strings.ToLower(k)
		switch name {
		case "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te":
			continue
		}
		if strings.HasPrefix(name, ":") {
			continue
		}
		for _, v := range vs {
			_ = c.henc.WriteField(hpack.HeaderField{Name: name, Value: v, Sensitive: false})
		}
	}
}
