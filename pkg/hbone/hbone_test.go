package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

func TestEchoAndRequestFields(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	s := dial(t, p, e.request())
	defer s.Close()

	msg := make([]byte, 3<<20+17) // several windows' worth and odd-sized
	rand.Read(msg)
	go func() {
		s.Write(msg)
		s.CloseWrite()
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo mismatch: got %d bytes, want %d", len(got), len(msg))
	}
	e.mu.Lock()
	r := e.requests[0]
	e.mu.Unlock()
	if r.Peer != e.client.ID || r.Authority != e.echo {
		t.Errorf("server saw peer %s authority %s, want %s %s", r.Peer, r.Authority, e.client.ID, e.echo)
	}
	for _, h := range []string{"Forwarded", "Baggage", "Traceparent"} {
		if r.Headers.Get(h) != e.request().Headers.Get(h) {
			t.Errorf("header %s = %q, want %q", h, r.Headers.Get(h), e.request().Headers.Get(h))
		}
	}
	if cs := s.ConnectionState(); cs.NegotiatedProtocol != "h2" || cs.Version != 0x0304 || !aesGCM(cs.CipherSuite) {
		t.Errorf("tls state: alpn %q version %x suite %x", cs.NegotiatedProtocol, cs.Version, cs.CipherSuite)
	}
}

func TestHalfCloseBothWays(t *testing.T) {
	// Upstream reads until EOF, then answers and closes: only works if the
	// client's CloseWrite reaches it as a FIN and its FIN comes back as EOF.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "got %d", n)
		c.(*net.TCPConn).CloseWrite()
	}()
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	r := e.request()
	r.Authority = ln.Addr().(*net.TCPAddr).AddrPort()
	s := dial(t, p, r)
	defer s.Close()
	s.Write([]byte("hello"))
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte("x")); err == nil {
		t.Fatal("write after CloseWrite succeeded")
	}
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "got 5" {
		t.Fatalf("read %q, %v; want \"got 5\"", got, err)
	}
}

func TestStatuses(t *testing.T) {
	tests := []struct {
		name    string
		handler HandlerFunc
		want    int
		refusal Refusal
	}{
		{"denied", func(context.Context, *ServerRequest) (net.Conn, error) {
			return nil, fmt.Errorf("policy x: %w", ErrDenied)
		}, http.StatusUnauthorized, RefusedDenied},
		{"unreachable", func(ctx context.Context, r *ServerRequest) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", "127.0.0.1:1")
		}, http.StatusServiceUnavailable, RefusedUpstream},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, envOpts{handler: tt.handler})
			p := e.pool(t, Params{})
			_, err := p.Dial(context.Background(), e.request())
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tt.want {
				t.Fatalf("dial error %v, want status %d", err, tt.want)
			}
			if n := e.srv.Stats().Refused[tt.refusal]; n != 1 {
				t.Fatalf("refusal %s counted %d times, want 1", tt.refusal, n)
			}
			// The connection stays usable for the next request.
			_, err = p.Dial(context.Background(), e.request())
			if !errors.As(err, &se) || se.Code != tt.want {
				t.Fatalf("second dial error %v, want status %d", err, tt.want)
			}
			if st := p.Stats(); st.ConnsOpened != 1 {
				t.Fatalf("pool opened %d connections, want 1", st.ConnsOpened)
			}
		})
	}
}

func TestPoolSharesHandshakeAndCapsStreams(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	const n = 150
	streams := make([]*Stream, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			streams[i], errs[i] = p.Dial(context.Background(), e.request())
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
	}
	st := p.Stats()
	if st.ConnsOpened != 2 || st.Conns != 2 {
		t.Fatalf("%d streams used %d connections (%d live), want 2", n, st.ConnsOpened, st.Conns)
	}
	if got := e.srv.Stats().Conns; got != 2 {
		t.Fatalf("server accepted %d connections, want 2", got)
	}
	counts := map[int]int{}
	for _, s := range streams {
		counts[s.c.streamCount()]++
	}
	if counts[100] != 100 || counts[50] != 50 {
		t.Fatalf("streams per connection %v, want 100 and 50", counts)
	}
	for i, s := range streams {
		msg := fmt.Sprintf("stream %d", i)
		s.Write([]byte(msg))
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
			t.Fatalf("stream %d echoed %q, %v", i, buf, err)
		}
		s.Close()
	}
	eventually(t, 5*time.Second, "streams to end", func() bool {
		for _, s := range streams {
			if s.c.streamCount() != 0 {
				return false
			}
		}
		return true
	})
	// A new stream reuses a connection.
	dial(t, p, e.request()).Close()
	if st := p.Stats(); st.ConnsOpened != 2 {
		t.Fatalf("opened %d connections after reuse, want 2", st.ConnsOpened)
	}
}

// TestPoolSpreadsStreams checks ConnsPerPeer: concurrent streams to one
// peer spread evenly over that many connections (their handshakes in
// parallel), streams opened one after another reuse one connection, and
// beyond the budget streams share the least-loaded connection.
func TestPoolSpreadsStreams(t *testing.T) {
	e := newEnv(t, envOpts{})
	newPool := func(spread int) *Pool {
		p, err := NewPool(PoolConfig{TLS: e.clientTLS(e.client), Logger: quietLogger(), ConnsPerPeer: spread})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}
	loads := func(streams []*Stream) map[*conn]int {
		out := map[*conn]int{}
		for _, s := range streams {
			out[s.c]++
		}
		return out
	}

	t.Run("concurrent streams spread evenly", func(t *testing.T) {
		p := newPool(4)
		streams := make([]*Stream, 8)
		errs := make([]error, 8)
		var wg sync.WaitGroup
		for i := range streams {
			wg.Go(func() { streams[i], errs[i] = p.Dial(context.Background(), e.request()) })
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("dial %d: %v", i, err)
			}
		}
		if st := p.Stats(); st.ConnsOpened != 4 || st.Conns != 4 {
			t.Fatalf("8 concurrent streams used %d connections (%d live), want 4", st.ConnsOpened, st.Conns)
		}
		for c, n := range loads(streams) {
			if n != 2 {
				t.Errorf("connection %p carries %d streams, want 2 each: %v", c, n, loads(streams))
			}
		}
		for i, s := range streams {
			msg := fmt.Sprint("stream ", i)
			s.Write([]byte(msg))
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
				t.Fatalf("stream %d echoed %q, %v", i, buf, err)
			}
			s.Close()
		}
	})

	t.Run("sequential streams reuse one connection", func(t *testing.T) {
		p := newPool(4)
		for range 5 {
			s := dial(t, p, e.request())
			s.Close()
			eventually(t, 5*time.Second, "stream to end", func() bool { return s.c.streamCount() == 0 })
		}
		if st := p.Stats(); st.ConnsOpened != 1 {
			t.Fatalf("5 streams one after another opened %d connections, want 1", st.ConnsOpened)
		}
	})

	t.Run("held streams fill the budget, then share", func(t *testing.T) {
		p := newPool(3)
		var streams []*Stream
		for range 7 {
			streams = append(streams, dial(t, p, e.request()))
		}
		if st := p.Stats(); st.ConnsOpened != 3 {
			t.Fatalf("7 held streams opened %d connections, want 3", st.ConnsOpened)
		}
		var got []int
		for _, n := range loads(streams) {
			got = append(got, n)
		}
		slices.Sort(got)
		if !slices.Equal(got, []int{2, 2, 3}) {
			t.Fatalf("streams per connection %v, want [2 2 3]", got)
		}
		for _, s := range streams {
			s.Close()
		}
	})

	t.Run("one means one shared connection", func(t *testing.T) {
		p := newPool(1)
		var streams []*Stream
		for range 4 {
			streams = append(streams, dial(t, p, e.request()))
		}
		if st := p.Stats(); st.ConnsOpened != 1 {
			t.Fatalf("ConnsPerPeer 1: %d connections, want 1", st.ConnsOpened)
		}
		for _, s := range streams {
			s.Close()
		}
	})
}

func TestPoolKeys(t *testing.T) {
	e := newEnv(t, envOpts{})
	other := e.ca.IssueWorkload(t, "client-ns", "other-sa")
	p, err := NewPool(PoolConfig{TLS: e.clientTLS(e.client, other), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	r1 := e.request()
	r2 := e.request()
	r2.Source = other.ID
	r3 := e.request()
	r3.Expected = append(r3.Expected, e.ca.WorkloadID(t, "server-ns", "service-san"))
	r4 := e.request()
	r4.Expected = append(r4.Expected, e.serverSVID.ID) // same set as r1
	for _, r := range []Request{r1, r2, r3, r4, r1} {
		dial(t, p, r).Close()
	}
	if st := p.Stats(); st.ConnsOpened != 3 {
		t.Fatalf("opened %d connections, want 3 (one per distinct key)", st.ConnsOpened)
	}
}

func TestGoAwayRespected(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	s1 := dial(t, p, e.request())
	defer s1.Close()
	e.srv.GoAway()
	eventually(t, 5*time.Second, "client to see GOAWAY", func() bool {
		s1.c.mu.Lock()
		defer s1.c.mu.Unlock()
		return s1.c.goAway
	})
	s2 := dial(t, p, e.request())
	defer s2.Close()
	if s1.c == s2.c {
		t.Fatal("new stream used the connection that received GOAWAY")
	}
	// The stream opened before GOAWAY still works.
	s1.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s1, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("old stream after GOAWAY: %q %v", buf, err)
	}
	s1.CloseWrite()
	io.Copy(io.Discard, s1)
	s1.Close()
	eventually(t, 5*time.Second, "drained connection to close", func() bool { return p.Stats().Conns == 1 })
}

func TestIdleEviction(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{IdleTimeout: 100 * time.Millisecond})
	s := dial(t, p, e.request())
	time.Sleep(300 * time.Millisecond) // an open stream keeps the connection
	if p.Stats().Conns != 1 {
		t.Fatal("connection with an open stream was evicted")
	}
	s.Write([]byte("x"))
	s.CloseWrite()
	io.Copy(io.Discard, s)
	s.Close()
	eventually(t, 3*time.Second, "idle connection to close", func() bool { return p.Stats().Conns == 0 })
	dial(t, p, e.request()).Close()
	if st := p.Stats(); st.ConnsOpened != 2 {
		t.Fatalf("opened %d connections, want 2", st.ConnsOpened)
	}
}

// freezer forwards TCP and can stop forwarding without closing, like a
// peer that vanished from the network.
type freezer struct {
	ln     net.Listener
	mu     sync.Mutex
	frozen bool
}

func startFreezer(t *testing.T, target string) *freezer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			t.Cleanup(func() { c.Close(); u.Close() })
			go f.pipe(u, c)
			go f.pipe(c, u)
		}
	}()
	return f
}

func (f *freezer) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		f.mu.Lock()
		frozen := f.frozen
		f.mu.Unlock()
		if n > 0 && !frozen { // frozen: swallow
			dst.Write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

func TestPingTimeout(t *testing.T) {
	e := newEnv(t, envOpts{})
	f := startFreezer(t, e.addr.String())
	p := e.pool(t, Params{PingInterval: 50 * time.Millisecond, PingTimeout: 200 * time.Millisecond})
	r := e.request()
	r.Addr = f.ln.Addr().(*net.TCPAddr).AddrPort()
	s := dial(t, p, r)
	time.Sleep(300 * time.Millisecond) // answered pings keep it alive
	if p.Stats().Conns != 1 {
		t.Fatal("healthy connection closed")
	}
	f.mu.Lock()
	f.frozen = true
	f.mu.Unlock()
	start := time.Now()
	_, err := s.Read(make([]byte, 1))
	if !errors.Is(err, ErrConnClosed) || !errors.Is(err, errPingTimeout) {
		t.Fatalf("read on frozen connection: %v, want ping timeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("ping timeout took %v", d)
	}
	eventually(t, time.Second, "pool to drop the dead connection", func() bool { return p.Stats().Conns == 0 })
}

func TestAbortResetsUpstream(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	upErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, err = io.Copy(io.Discard, c)
		upErr <- err
	}()
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	r := e.request()
	r.Authority = ln.Addr().(*net.TCPAddr).AddrPort()
	s := dial(t, p, r)
	s.Write([]byte("partial"))
	s.Abort()
	select {
	case err := <-upErr:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("upstream saw %v, want connection reset", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream never saw the abort")
	}
	if _, err := s.Write([]byte("x")); err == nil {
		t.Fatal("write after Abort succeeded")
	}
}

func TestDeadlines(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	s := dial(t, p, e.request())
	defer s.Close()
	s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := s.Read(make([]byte, 1))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past deadline: %v", err)
	}
	// The stream stays usable after the deadline moves.
	s.SetReadDeadline(time.Time{})
	s.Write([]byte("ok"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ok" {
		t.Fatalf("read after clearing deadline: %q %v", buf, err)
	}
}

func TestNoGoroutineLeak(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	dial(t, p, e.request()).Close() // warm: connection goroutines exist
	time.Sleep(50 * time.Millisecond)
	before := runtime.NumGoroutine()
	for range 200 {
		s := dial(t, p, e.request())
		s.Write([]byte("abc"))
		s.CloseWrite()
		io.Copy(io.Discard, s)
		s.Close()
	}
	for range 50 {
		s := dial(t, p, e.request())
		s.Write([]byte("abc"))
		s.Abort()
	}
	eventually(t, 5*time.Second, fmt.Sprintf("goroutines back to %d", before), func() bool {
		return runtime.NumGoroutine() <= before
	})
	eventually(t, 5*time.Second, "server streams to end", func() bool {
		e.srv.mu.Lock()
		defer e.srv.mu.Unlock()
		for c := range e.srv.live {
			if c.streamCount() != 0 {
				return false
			}
		}
		return true
	})
}

func TestConcurrentIntegrity(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := p.Dial(context.Background(), e.request())
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close()
			msg := make([]byte, 256<<10+i)
			rand.Read(msg)
			want := sha256.Sum256(msg)
			go func() { s.Write(msg); s.CloseWrite() }()
			h := sha256.New()
			if _, err := io.Copy(h, s); err != nil {
				t.Error(err)
				return
			}
			if !bytes.Equal(h.Sum(nil), want[:]) {
				t.Errorf("stream %d: sha256 mismatch", i)
			}
		}()
	}
	wg.Wait()
}

func TestPoolHonorsServerStreamLimit(t *testing.T) {
	e := newEnv(t, envOpts{params: Params{MaxStreamsPerConn: 2}})
	p := e.pool(t, Params{})
	var streams []*Stream
	for range 5 {
		streams = append(streams, dial(t, p, e.request()))
	}
	if st := p.Stats(); st.ConnsOpened != 3 {
		t.Fatalf("5 streams with a server limit of 2 opened %d connections, want 3", st.ConnsOpened)
	}
	if n := e.srv.Stats().Refused[RefusedStreamLimit]; n != 0 {
		t.Fatalf("server refused %d streams: the pool should not exceed its limit", n)
	}
	for _, s := range streams {
		s.Close()
	}
}

func TestDialHooksAndSourceIP(t *testing.T) {
	e := newEnv(t, envOpts{})
	src := netip.MustParseAddr("127.0.0.2")

	// The default dialer binds SourceIP.
	p := e.pool(t, Params{})
	r := e.request()
	r.SourceIP = src
	dial(t, p, r).Close()
	e.mu.Lock()
	got := e.requests[len(e.requests)-1].RemoteAddr.Addr()
	e.mu.Unlock()
	if got != src {
		t.Fatalf("server saw tunnel from %s, want %s", got, src)
	}

	// A custom DialContext sees the request that caused the dial.
	var seen []Request
	var mu sync.Mutex
	p2, err := NewPool(PoolConfig{
		TLS:    e.clientTLS(e.client),
		Logger: quietLogger(),
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			r, ok := DialRequest(ctx)
			if !ok {
				return nil, errors.New("no request in dial context")
			}
			mu.Lock()
			seen = append(seen, r)
			mu.Unlock()
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	dial(t, p2, r).Close()
	dial(t, p2, r).Close()
	if len(seen) != 1 || seen[0].SourceIP != src || seen[0].Addr != e.addr {
		t.Fatalf("dial hook calls %+v, want one for %s from %s", seen, e.addr, src)
	}
	r.SourceIP = netip.Addr{}
	dial(t, p2, r).Close() // another key
	if len(seen) != 2 {
		t.Fatalf("dial hook called %d times, want 2 (source IP is part of the key)", len(seen))
	}
}

func TestServerClosesIdleConnections(t *testing.T) {
	e := newEnv(t, envOpts{params: Params{IdleTimeout: 100 * time.Millisecond}})
	p := e.pool(t, Params{})
	s := dial(t, p, e.request())
	s.Write([]byte("x"))
	s.CloseWrite()
	io.Copy(io.Discard, s)
	s.Close()
	// The server's GOAWAY reaches the client, which drops the connection.
	eventually(t, 3*time.Second, "server to close the idle connection", func() bool { return p.Stats().Conns == 0 })
	dial(t, p, e.request()).Close()
}

func TestUpstreamResetReachesClient(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, 5)
		io.ReadFull(c, buf)
		c.(*net.TCPConn).SetLinger(0)
		c.Close() // RST
	}()
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	r := e.request()
	r.Authority = ln.Addr().(*net.TCPAddr).AddrPort()
	s := dial(t, p, r)
	defer s.Close()
	s.Write([]byte("hello"))
	_, err = io.ReadAll(s)
	var re *StreamResetError
	if !errors.As(err, &re) || !re.Remote {
		t.Fatalf("read after upstream reset: %v, want a remote stream reset", err)
	}
}

func TestLargeConcurrentTransfers(t *testing.T) {
	// 8 streams x 8 MiB both ways on one connection: more than the 16 MiB
	// connection window, so WINDOW_UPDATE accounting must be exact.
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := p.Dial(context.Background(), e.request())
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close()
			msg := make([]byte, 8<<20+i)
			rand.Read(msg)
			want := sha256.Sum256(msg)
			go func() { s.Write(msg); s.CloseWrite() }()
			h := sha256.New()
			if n, err := io.CopyBuffer(h, s, make([]byte, 7000)); err != nil || n != int64(len(msg)) {
				t.Errorf("stream %d: read %d bytes, %v", i, n, err)
				return
			}
			if !bytes.Equal(h.Sum(nil), want[:]) {
				t.Errorf("stream %d: sha256 mismatch", i)
			}
		}()
	}
	wg.Wait()
	if st := p.Stats(); st.ConnsOpened != 1 {
		t.Fatalf("opened %d connections, want 1", st.ConnsOpened)
	}
}

func TestServerGetConfigForClient(t *testing.T) {
	// A server whose certificate is chosen per handshake (as the node
	// agent does, per pod IP) still gets HBONE's TLS parameters enforced.
	var chosen int
	var mu sync.Mutex
	e := newEnv(t, envOpts{tlsCfg: func(cfg *tls.Config) {
		inner := cfg.Clone()
		inner.MinVersion = tls.VersionTLS12 // loosened on purpose: the server must force 1.3
		*cfg = tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			mu.Lock()
			chosen++
			mu.Unlock()
			return inner, nil
		}}
	}})
	dial(t, e.pool(t, Params{}), e.request()).Close()
	cfg := tlsconfig.MTLSClientConfig(e.client, e.ca.Bundle(), tlsconfig.AuthorizeAny())
	cfg.MaxVersion = tls.VersionTLS12
	cfg.NextProtos = []string{"h2"}
	if c, err := tls.Dial("tcp", e.addr.String(), cfg); err == nil {
		c.Close()
		t.Fatal("TLS 1.2 accepted through GetConfigForClient")
	}
	mu.Lock()
	defer mu.Unlock()
	if chosen != 2 {
		t.Fatalf("GetConfigForClient called %d times, want 2", chosen)
	}
}

func TestIPv6Loopback(t *testing.T) {
	up, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	defer up.Close()
	go func() {
		c, err := up.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	e := newEnv(t, envOpts{})
	// A second HBONE listener on [::1] for the same server.
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	go e.srv.Serve(ln)
	p := e.pool(t, Params{})
	r := e.request()
	r.Addr = ln.Addr().(*net.TCPAddr).AddrPort()
	r.Authority = up.Addr().(*net.TCPAddr).AddrPort()
	s := dial(t, p, r)
	defer s.Close()
	s.Write([]byte("v6"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "v6" {
		t.Fatalf("echo over IPv6: %q %v", buf, err)
	}
	e.mu.Lock()
	got := e.requests[len(e.requests)-1]
	e.mu.Unlock()
	if got.Authority != r.Authority || !got.RemoteAddr.Addr().Is6() {
		t.Fatalf("server saw authority %s from %s", got.Authority, got.RemoteAddr)
	}
}

// TestGoAwayOnEverySpreadConnection is a peer handing over: it sends
// GOAWAY on each of the connections a pool spread its streams over (and
// closes the idle ones at once) while new CONNECTs race it. No CONNECT may
// fail: each one the peer never processed is retried, and the pool must
// not give up before it has tried a connection the peer did not drain,
// however many of its connections the peer drains one after another.
func TestGoAwayOnEverySpreadConnection(t *testing.T) {
	e := newEnv(t, envOpts{})
	const spread, dialers, rounds = 4, 16, 40
	p, err := NewPool(PoolConfig{TLS: e.clientTLS(e.client), Logger: quietLogger(), ConnsPerPeer: spread})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var failed []error
	for round := range rounds {
		// Open spread connections and leave them idle in the pool.
		held := make([]*Stream, 2*spread)
		var wg sync.WaitGroup
		for i := range held {
			wg.Go(func() { held[i] = dial(t, p, e.request()) })
		}
		wg.Wait()
		for _, s := range held {
			s.Close()
		}
		eventually(t, 5*time.Second, "held streams to end", func() bool {
			for _, s := range held {
				if s.c.streamCount() != 0 {
					return false
				}
			}
			return true
		})
		errs := make([]error, dialers)
		start := make(chan struct{})
		for i := range dialers {
			wg.Go(func() {
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				s, err := p.Dial(ctx, e.request())
				if err != nil {
					errs[i] = fmt.Errorf("round %d dial %d: %w", round, i, err)
					return
				}
				s.Close()
			})
		}
		close(start)
		e.srv.GoAway()
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				failed = append(failed, err)
			}
		}
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d CONNECTs racing a peer's GOAWAY on %d connections failed; first: %v", len(failed), rounds*dialers, spread, failed[0])
	}
}
