package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/warren-mesh/warren/internal/testpki"
)

// rawClient is a bare HTTP/2 client over real TLS that sends whatever
// header lists a test asks for and ignores the server's stream limit.
type rawClient struct {
	t       *testing.T
	tc      *tls.Conn
	fr      *http2.Framer
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
	frames  chan rawEvent
	pending map[uint32]rawEvent
	nextID  uint32
	wmu     sync.Mutex // the reader goroutine writes SETTINGS acks
}

type rawEvent struct {
	stream uint32
	status int
	rst    http2.ErrCode
	isRST  bool
	goAway bool
}

func (e *env) rawTLS(t *testing.T, cert *testpki.SVID, alpn ...string) (*tls.Conn, error) {
	t.Helper()
	var cfg *tls.Config
	if cert != nil {
		cfg = tlsconfig.MTLSClientConfig(cert, e.ca.Bundle(), tlsconfig.AuthorizeID(e.serverSVID.ID))
	} else {
		cfg = tlsconfig.TLSClientConfig(e.ca.Bundle(), tlsconfig.AuthorizeID(e.serverSVID.ID))
	}
	cfg.NextProtos = alpn
	d := &tls.Dialer{Config: cfg}
	c, err := d.DialContext(context.Background(), "tcp", e.addr.String())
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	// TLS 1.3 client certificates are checked after the client's handshake
	// ends: a refusal shows up on the first read.
	tc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	_, err = tc.Read(make([]byte, 1))
	tc.SetReadDeadline(time.Time{})
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return tc, nil
	}
	tc.Close()
	if err == nil {
		err = errors.New("unexpected data before preface")
	}
	return nil, err
}

func (e *env) raw(t *testing.T) *rawClient {
	t.Helper()
	tc, err := e.rawTLS(t, e.client, "h2")
	if err != nil {
		t.Fatalf("raw tls: %v", err)
	}
	t.Cleanup(func() { tc.Close() })
	rc := &rawClient{t: t, tc: tc, fr: http2.NewFramer(tc, tc), frames: make(chan rawEvent, 512), pending: map[uint32]rawEvent{}, nextID: 1}
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	rc.henc = hpack.NewEncoder(&rc.hbuf)
	io.WriteString(tc, http2.ClientPreface)
	rc.fr.WriteSettings()
	go func() {
		for {
			f, err := rc.fr.ReadFrame()
			if err != nil {
				close(rc.frames)
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					rc.wmu.Lock()
					rc.fr.WriteSettingsAck()
					rc.wmu.Unlock()
				}
			case *http2.MetaHeadersFrame:
				st, _ := strconv.Atoi(f.PseudoValue("status"))
				rc.frames <- rawEvent{stream: f.StreamID, status: st}
			case *http2.RSTStreamFrame:
				rc.frames <- rawEvent{stream: f.StreamID, rst: f.ErrCode, isRST: true}
			case *http2.GoAwayFrame:
				rc.frames <- rawEvent{goAway: true}
			}
		}
	}()
	return rc
}

// send opens a stream with the given header fields and returns its ID.
func (rc *rawClient) send(fields ...string) uint32 {
	rc.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		rc.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	id := rc.nextID
	rc.nextID += 2
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	if err := rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.hbuf.Bytes(), EndHeaders: true}); err != nil {
		rc.t.Fatalf("write headers: %v", err)
	}
	return id
}

// await returns the first response HEADERS or RST_STREAM for stream id.
func (rc *rawClient) await(id uint32) rawEvent {
	if ev, ok := rc.pending[id]; ok {
		delete(rc.pending, id)
		return ev
	}
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-rc.frames:
			if !ok {
				rc.t.Fatalf("connection closed waiting for stream %d", id)
			}
			if ev.stream == id {
				return ev
			}
			if _, seen := rc.pending[ev.stream]; !seen {
				rc.pending[ev.stream] = ev
			}
		case <-timeout:
			rc.t.Fatalf("no answer on stream %d", id)
		}
	}
}

// assertServing checks that a well-behaved client still gets through.
func (e *env) assertServing(t *testing.T) {
	t.Helper()
	p := e.pool(t, Params{})
	s := dial(t, p, e.request())
	defer s.Close()
	s.Write([]byte("still serving"))
	buf := make([]byte, 13)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "still serving" {
		t.Fatalf("server stopped serving: %q %v", buf, err)
	}
}

func TestBadPeersRefused(t *testing.T) {
	e := newEnv(t, envOpts{})
	otherCA := testpki.NewCA(t, "other.test")
	rogueCA := testpki.NewCA(t, testTD) // right domain name, wrong key

	tests := []struct {
		name    string
		conn    func(t *testing.T) error // returns the client-side error
		refusal Refusal
	}{
		{"wrong trust domain", func(t *testing.T) error {
			_, err := e.rawTLS(t, otherCA.IssueWorkload(t, "client-ns", "client-sa"), "h2")
			return err
		}, RefusedHandshake},
		{"trust domain name from another CA", func(t *testing.T) error {
			_, err := e.rawTLS(t, rogueCA.IssueWorkload(t, "client-ns", "client-sa"), "h2")
			return err
		}, RefusedHandshake},
		{"expired certificate", func(t *testing.T) error {
			_, err := e.rawTLS(t, e.ca.IssueWorkload(t, "client-ns", "client-sa", testpki.Expired()), "h2")
			return err
		}, RefusedHandshake},
		{"not yet valid certificate", func(t *testing.T) error {
			_, err := e.rawTLS(t, e.ca.IssueWorkload(t, "client-ns", "client-sa", testpki.NotYetValid()), "h2")
			return err
		}, RefusedHandshake},
		{"certificate without SPIFFE ID", func(t *testing.T) error {
			_, err := e.rawTLS(t, e.ca.IssueWorkload(t, "client-ns", "client-sa", testpki.NoURISAN()), "h2")
			return err
		}, RefusedHandshake},
		{"no client certificate", func(t *testing.T) error {
			_, err := e.rawTLS(t, nil, "h2")
			return err
		}, RefusedHandshake},
		{"TLS 1.2", func(t *testing.T) error {
			cfg := tlsconfig.MTLSClientConfig(e.client, e.ca.Bundle(), tlsconfig.AuthorizeAny())
			cfg.MaxVersion = tls.VersionTLS12
			cfg.NextProtos = []string{"h2"}
			c, err := tls.Dial("tcp", e.addr.String(), cfg)
			if err == nil {
				c.Close()
			}
			return err
		}, RefusedHandshake},
		{"HTTP/1.1 ALPN", func(t *testing.T) error {
			// Go's server continues without ALPN when a client offers only
			// http/1.1; the HBONE server then refuses the missing h2.
			tc, err := e.rawTLS(t, e.client, "http/1.1")
			if err != nil {
				return err
			}
			defer tc.Close()
			_, err = tc.Read(make([]byte, 1))
			return err
		}, RefusedALPN},
		{"no ALPN", func(t *testing.T) error {
			tc, err := e.rawTLS(t, e.client)
			if err != nil {
				return err
			}
			defer tc.Close()
			_, err = tc.Read(make([]byte, 1))
			return err
		}, RefusedALPN},
		{"HTTP/1.1 CONNECT over h2 ALPN", func(t *testing.T) error {
			tc, err := e.rawTLS(t, e.client, "h2")
			if err != nil {
				return err
			}
			defer tc.Close()
			io.WriteString(tc, "CONNECT "+e.echo.String()+" HTTP/1.1\r\nHost: "+e.echo.String()+"\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
			if err != nil {
				return err
			}
			return errors.New(resp.Status)
		}, RefusedPreface},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := e.srv.Stats().Refused[tt.refusal]
			err := tt.conn(t)
			if err == nil {
				t.Fatal("client was not refused")
			}
			t.Logf("client saw: %v", err)
			eventually(t, 2*time.Second, "refusal to be counted", func() bool {
				return e.srv.Stats().Refused[tt.refusal] == before+1
			})
			e.assertServing(t)
		})
	}
}

func TestClientRefusesUnexpectedServer(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	r := e.request()
	r.Expected = []spiffeid.ID{e.ca.WorkloadID(t, "server-ns", "someone-else")}
	_, err := p.Dial(context.Background(), r)
	if err == nil || !strings.Contains(err.Error(), "tls handshake") {
		t.Fatalf("dial to a server with an unexpected SAN: %v", err)
	}
	if st := p.Stats(); st.DialErrors != 1 || st.Conns != 0 {
		t.Fatalf("pool stats %+v, want one dial error and no connection", st)
	}
	eventually(t, 2*time.Second, "server to count the aborted handshake", func() bool {
		return e.srv.Stats().Refused[RefusedHandshake] == 1
	})
	e.assertServing(t)
}

func TestMalformedConnect(t *testing.T) {
	e := newEnv(t, envOpts{})
	auth := e.echo.String()
	tests := []struct {
		name   string
		fields []string
		want   int
	}{
		{"with :path", []string{":method", "CONNECT", ":authority", auth, ":path", "/"}, 400},
		{"with :scheme", []string{":method", "CONNECT", ":scheme", "https", ":authority", auth}, 400},
		{"with :protocol", []string{":method", "CONNECT", ":protocol", "websocket", ":authority", auth}, 400},
		{"no authority", []string{":method", "CONNECT"}, 400},
		{"hostname authority", []string{":method", "CONNECT", ":authority", "echo.default.svc:80"}, 400},
		{"no port", []string{":method", "CONNECT", ":authority", "127.0.0.1"}, 400},
		{"port zero", []string{":method", "CONNECT", ":authority", "127.0.0.1:0"}, 400},
		{"unspecified address", []string{":method", "CONNECT", ":authority", "0.0.0.0:80"}, 400},
		{"connection header", []string{":method", "CONNECT", ":authority", auth, "connection", "close"}, 400},
		{"GET", []string{":method", "GET", ":scheme", "https", ":path", "/", ":authority", auth}, 400},
		{"POST without path", []string{":method", "POST", ":authority", auth}, 405},
	}
	rc := e.raw(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := e.srv.Stats().Refused[RefusedMalformed]
			ev := rc.await(rc.send(tt.fields...))
			if ev.isRST || ev.status != tt.want {
				t.Fatalf("got %+v, want status %d", ev, tt.want)
			}
			if got := e.srv.Stats().Refused[RefusedMalformed]; got != before+1 {
				t.Fatalf("malformed refusals %d, want %d", got, before+1)
			}
		})
	}
	// The same connection still serves a good CONNECT.
	ev := rc.await(rc.send(":method", "CONNECT", ":authority", auth))
	if ev.status != 200 {
		t.Fatalf("good CONNECT after malformed ones: %+v", ev)
	}
	e.assertServing(t)
}

func TestOversizedHeaders(t *testing.T) {
	e := newEnv(t, envOpts{})
	p := e.pool(t, Params{})
	// Several fields that together pass the limit: 431, connection kept.
	r := e.request()
	chunk := strings.Repeat("x", DefaultMaxHeaderListSize/3)
	r.Headers = http.Header{"Baggage": {chunk, chunk, chunk, chunk}}
	_, err := p.Dial(context.Background(), r)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("oversized header list: %v, want 431", err)
	}
	if n := e.srv.Stats().Refused[RefusedHeaderSize]; n != 1 {
		t.Fatalf("header size refusals %d, want 1", n)
	}
	dial(t, p, e.request()).Close()
	if st := p.Stats(); st.ConnsOpened != 1 {
		t.Fatalf("connections opened %d, want 1", st.ConnsOpened)
	}

	// One value longer than the whole limit: HPACK refuses to decode it,
	// a connection error (as in x/net's server); the pool recovers.
	r.Headers = http.Header{"Baggage": {strings.Repeat("y", DefaultMaxHeaderListSize+1)}}
	if _, err := p.Dial(context.Background(), r); err == nil {
		t.Fatal("giant header accepted")
	}
	if n := e.srv.Stats().Refused[RefusedProtocol]; n == 0 {
		t.Fatal("connection error not counted")
	}
	dial(t, p, e.request()).Close()
	e.assertServing(t)
}

func TestStreamLimitEnforced(t *testing.T) {
	e := newEnv(t, envOpts{params: Params{MaxStreamsPerConn: 10}})
	rc := e.raw(t)
	auth := e.echo.String()
	var ids []uint32
	for range 10 {
		ids = append(ids, rc.send(":method", "CONNECT", ":authority", auth))
	}
	for _, id := range ids {
		if ev := rc.await(id); ev.status != 200 {
			t.Fatalf("stream %d within the limit: %+v", id, ev)
		}
	}
	over := rc.send(":method", "CONNECT", ":authority", auth)
	if ev := rc.await(over); !ev.isRST || ev.rst != http2.ErrCodeRefusedStream {
		t.Fatalf("stream over the limit: %+v, want RST_STREAM REFUSED_STREAM", ev)
	}
	if n := e.srv.Stats().Refused[RefusedStreamLimit]; n != 1 {
		t.Fatalf("stream limit refusals %d, want 1", n)
	}
	// Ending one stream frees a slot on the same connection.
	rc.wmu.Lock()
	rc.fr.WriteRSTStream(ids[0], http2.ErrCodeCancel)
	rc.wmu.Unlock()
	eventually(t, 2*time.Second, "slot to free", func() bool {
		id := rc.send(":method", "CONNECT", ":authority", auth)
		ev := rc.await(id)
		return ev.status == 200
	})
	e.assertServing(t)
}

func TestRapidResetBounded(t *testing.T) {
	// A handler stuck on its upstream, and a client that opens and resets
	// streams in a loop: the server must stop starting handlers.
	release := make(chan struct{})
	var mu sync.Mutex
	started := 0
	h := HandlerFunc(func(ctx context.Context, r *ServerRequest) (net.Conn, error) {
		mu.Lock()
		started++
		mu.Unlock()
		<-release // ignores ctx on purpose
		return nil, errors.New("released")
	})
	const limit = 10
	e := newEnv(t, envOpts{handler: h, params: Params{MaxStreamsPerConn: limit}})
	rc := e.raw(t)
	auth := e.echo.String()
	refused := 0
	for range 100 {
		id := rc.send(":method", "CONNECT", ":authority", auth)
		rc.wmu.Lock()
		rc.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		rc.wmu.Unlock()
	}
	// Collect answers: REFUSED_STREAM once the handlers are saturated.
	timeout := time.After(2 * time.Second)
collect:
	for {
		select {
		case ev, ok := <-rc.frames:
			if !ok {
				break collect
			}
			if ev.isRST && ev.rst == http2.ErrCodeRefusedStream {
				refused++
				if refused >= 100-2*limit {
					break collect
				}
			}
		case <-timeout:
			break collect
		}
	}
	mu.Lock()
	n := started
	mu.Unlock()
	close(release)
	if n > 2*limit {
		t.Fatalf("%d handlers started for 100 reset streams, want at most %d", n, 2*limit)
	}
	if refused == 0 || e.srv.Stats().Refused[RefusedStreamLimit] == 0 {
		t.Fatalf("no stream refused (%d refused, stats %+v)", refused, e.srv.Stats())
	}
	// Still serving: the released handler now answers 503 at once.
	_, err := e.pool(t, Params{}).Dial(context.Background(), e.request())
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusServiceUnavailable {
		t.Fatalf("dial after the flood: %v, want 503", err)
	}
}
