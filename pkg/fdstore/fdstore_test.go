package fdstore

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestPutGetDeleteList(t *testing.T) {
	srv, path := startServer(t, Config{})
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v, mode %v", err, fi.Mode())
	}
	if fi, err := os.Stat(strings.TrimSuffix(path, "/fdstore.sock")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("created parent: %v, mode %v", err, fi.Mode())
	}
	c := dial(t, path)
	ctx := t.Context()
	keys := []string{Key(7, "hbone"), Key(7, "inbound"), Key(8, "hbone"), "other/x"}
	addrs := map[string]string{}
	for _, k := range keys {
		ln := listenTCP(t)
		if err := c.Put(ctx, k, ln); err != nil {
			t.Fatal(err)
		}
		addrs[k] = ln.Addr().String()
	}
	if got := srv.Len(); got != len(keys) {
		t.Fatalf("Len %d, want %d", got, len(keys))
	}

	tests := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"list", func(t *testing.T) {
			got, err := c.List(ctx)
			want := slices.Sorted(slices.Values(keys))
			if err != nil || !slices.Equal(got, want) {
				t.Fatalf("List = %q, %v; want %q", got, err, want)
			}
		}},
		{"list prefix", func(t *testing.T) {
			got, err := c.ListPrefix(ctx, NetnsPrefix(7))
			if err != nil || !slices.Equal(got, []string{Key(7, "hbone"), Key(7, "inbound")}) {
				t.Fatalf("ListPrefix = %q, %v", got, err)
			}
		}},
		{"get each", func(t *testing.T) {
			for _, k := range keys {
				f, err := c.Get(ctx, k)
				if err != nil {
					t.Fatal(err)
				}
				ln, err := ListenerFromFD(f)
				f.Close()
				if err != nil {
					t.Fatal(err)
				}
				if ln.Addr().String() != addrs[k] {
					t.Errorf("%s: addr %s, want %s", k, ln.Addr(), addrs[k])
				}
				ln.Close()
			}
		}},
		{"get prefix", func(t *testing.T) {
			es, err := c.GetPrefix(ctx, NetnsPrefix(7))
			if err != nil || len(es) != 2 || es[0].Key != Key(7, "hbone") || es[1].Key != Key(7, "inbound") {
				t.Fatalf("GetPrefix = %v, %v", es, err)
			}
			closeEntries(es)
		}},
		{"get missing", func(t *testing.T) {
			_, err := c.Get(ctx, Key(9, "hbone"))
			if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "fdstore get netns/9/hbone") {
				t.Fatalf("Get missing = %v", err)
			}
		}},
		{"delete", func(t *testing.T) {
			if err := c.Delete(ctx, Key(8, "hbone")); err != nil {
				t.Fatal(err)
			}
			if err := c.Delete(ctx, Key(8, "hbone")); err != nil {
				t.Fatalf("delete of a missing key: %v", err)
			}
			if srv.Len() != 3 {
				t.Fatalf("Len %d after delete", srv.Len())
			}
		}},
		{"delete prefix", func(t *testing.T) {
			n, err := c.DeletePrefix(ctx, NetnsPrefix(7))
			if err != nil || n != 2 {
				t.Fatalf("DeletePrefix = %d, %v", n, err)
			}
			got, err := c.List(ctx)
			if err != nil || !slices.Equal(got, []string{"other/x"}) {
				t.Fatalf("List = %q, %v", got, err)
			}
		}},
		{"info", func(t *testing.T) {
			info, err := c.Info(ctx)
			if err != nil || info.ID != srv.Info().ID || info.Entries != 1 || info.PID != os.Getpid() || info.Version != ProtocolVersion {
				t.Fatalf("Info = %+v, %v", info, err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, tt.run)
	}
}

// A put under a held key closes the holder's old copy: the old socket, no
// longer open anywhere, stops listening.
func TestPutReplacesAndCloses(t *testing.T) {
	_, path := startServer(t, Config{})
	c := dial(t, path)
	ctx := t.Context()
	old := listenTCP(t)
	oldAddr := old.Addr().String()
	if err := c.Put(ctx, "k", old); err != nil {
		t.Fatal(err)
	}
	old.Close()
	// Still listening: the holder has it.
	if conn, err := net.DialTimeout("tcp", oldAddr, time.Second); err != nil {
		t.Fatalf("held socket refused: %v", err)
	} else {
		conn.Close()
	}
	repl := listenTCP(t)
	if err := c.Put(ctx, "k", repl); err != nil {
		t.Fatal(err)
	}
	if _, err := net.DialTimeout("tcp", oldAddr, time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("replaced socket still open: dial = %v", err)
	}
	f, err := c.Get(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ln, err := ListenerFromFD(f)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln.Addr().String() != repl.Addr().String() {
		t.Fatalf("Get after replace: %s, want %s", ln.Addr(), repl.Addr())
	}
}

// The crash guarantee in miniature: the agent's own fd is gone, a connect
// completes into the held socket's queue, and the next agent accepts it
// from the copy it gets back.
func TestConnectWhileNoAgentAccepts(t *testing.T) {
	_, path := startServer(t, Config{})
	agent := dial(t, path)
	ln := listenTCP(t)
	addr := ln.Addr().String()
	if err := agent.Put(t.Context(), "pod/inbound", ln); err != nil {
		t.Fatal(err)
	}
	ln.Close()
	agent.Close()

	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("connect while no agent runs: %v", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("queued")); err != nil {
		t.Fatal(err)
	}

	next := dial(t, path)
	f, err := next.Get(t.Context(), "pod/inbound")
	if err != nil {
		t.Fatal(err)
	}
	ln2, err := ListenerFromFD(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	acceptAndEcho(t, ln2, "queued")
	expectEcho(t, conn, "queued")
}

// With backlog N and nobody accepting, N+1 connects complete (Linux counts
// the queue full above the backlog); the next SYN is dropped, so that
// connect is neither refused nor completed but retransmits its SYN (1 s
// initial RTO) and completes once the queue has room.
func TestBacklogWhileNoAgentAccepts(t *testing.T) {
	const backlog = 4
	_, path := startServer(t, Config{})
	c := dial(t, path)
	f, addr := listenBacklog(t, backlog)
	if err := c.Put(t.Context(), "b", f); err != nil {
		t.Fatal(err)
	}
	f.Close()

	var queued []net.Conn
	defer func() {
		for _, q := range queued {
			q.Close()
		}
	}()
	for i := 0; i < backlog+4; i++ {
		start := time.Now()
		conn, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err != nil {
			t.Logf("backlog %d: connect #%d did not complete in %v: %v", backlog, i+1, time.Since(start).Round(time.Millisecond), err)
			break
		}
		conn.Write([]byte("q"))
		queued = append(queued, conn)
	}
	t.Logf("backlog %d: %d connects completed with nobody accepting", backlog, len(queued))
	if len(queued) < backlog || len(queued) > backlog+1 {
		t.Errorf("%d connects completed; want %d or %d", len(queued), backlog, backlog+1)
	}

	// One more waits in SYN retransmission until an agent accepts.
	type result struct {
		conn net.Conn
		err  error
		took time.Duration
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		done <- result{conn, err, time.Since(start)}
	}()
	select {
	case r := <-done:
		t.Fatalf("connect beyond the backlog completed at once (%v, %v)", r.err, r.took)
	case <-time.After(200 * time.Millisecond):
	}
	g, err := c.Get(t.Context(), "b")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ListenerFromFD(g)
	g.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for range queued {
		acceptAndEcho(t, ln, "q")
	}
	for _, q := range queued {
		expectEcho(t, q, "q")
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("connect beyond the backlog: %v after %v", r.err, r.took)
	}
	defer r.conn.Close()
	t.Logf("backlog %d: connect #%d completed after %v (SYN retransmitted once the queue had room)", backlog, len(queued)+1, r.took.Round(time.Millisecond))
	r.conn.Write([]byte("late"))
	acceptAndEcho(t, ln, "late")
	expectEcho(t, r.conn, "late")
}

// A real agent process killed with SIGKILL loses nothing: its listener
// stays in LISTEN and the next agent accepts what queued meanwhile.
func TestAgentKill9(t *testing.T) {
	srv, path := startServer(t, Config{})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+path)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(readLine(t, out))
	if len(fields) != 2 {
		t.Fatalf("child said %q", fields)
	}
	addr := fields[0]
	cookie, _ := strconv.ParseUint(fields[1], 10, 64)
	cmd.Process.Kill()
	cmd.Wait()
	if srv.Len() != 1 {
		t.Fatalf("holder has %d entries after the agent died", srv.Len())
	}

	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("connect after kill -9: %v", err)
	}
	defer conn.Close()
	conn.Write([]byte("after-kill"))

	st := &ListenerStore{Client: dial(t, path)}
	ln, err := st.Take(cookie, "inbound")
	if err != nil || ln == nil {
		t.Fatalf("Take = %v, %v", ln, err)
	}
	defer ln.Close()
	acceptAndEcho(t, ln, "after-kill")
	expectEcho(t, conn, "after-kill")
}

// A client whose connection breaks, mid-frame or before reading a reply,
// loses nothing it put.
func TestClientGoneLosesNothing(t *testing.T) {
	srv, path := startServer(t, Config{})
	ctx := t.Context()
	c := dial(t, path)
	for _, k := range []string{"a", "b"} {
		if err := c.Put(ctx, k, listenTCP(t)); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()

	// Half a frame, then gone.
	half := rawDial(t, path)
	half.c.Write([]byte{0, 0, 0, 100, '{', '"'})
	half.close()

	// A put sent, the reply never read.
	ln := listenTCP(t)
	unread := rawDial(t, path)
	sc, _ := ln.SyscallConn()
	sc.Control(func(fd uintptr) {
		if err := unread.writeFrame(&request{Op: opPut, Key: "c", FDs: 1}, []int{int(fd)}); err != nil {
			t.Error(err)
		}
	})
	unread.close()

	waitFor(t, "the unread put", func() bool { return srv.Len() == 3 })
	got, err := dial(t, path).List(ctx)
	if err != nil || !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("List = %q, %v", got, err)
	}
}

// A client reconnects on the call after its connection broke, and retries
// once a call on a connection that went stale meanwhile.
func TestClientReconnects(t *testing.T) {
	path := sockPath(t)
	first := startAt(t, path, Config{})
	ctx := t.Context()
	c := dial(t, path)
	if err := c.Put(ctx, "k", listenTCP(t)); err != nil {
		t.Fatal(err)
	}
	firstID := c.Holder().ID
	first.Close()

	// No holder: the call fails, saying which.
	if _, err := c.List(ctx); err == nil || !strings.Contains(err.Error(), "fdstore list") {
		t.Fatalf("List with no holder = %v", err)
	}

	second := startAt(t, path, Config{})
	keys, err := c.List(ctx)
	if err != nil || len(keys) != 0 {
		t.Fatalf("List on the new holder = %q, %v", keys, err)
	}
	if h := c.Holder(); h == nil || h.ID == firstID || h.ID != second.Info().ID {
		t.Fatalf("Holder = %v, want the new one", h)
	}

	// Stale connection: the holder restarts between two calls.
	second.Close()
	third := startAt(t, path, Config{})
	if err := c.Put(ctx, "k", listenTCP(t)); err != nil {
		t.Fatalf("Put over a stale connection: %v", err)
	}
	if third.Len() != 1 {
		t.Fatalf("third holder has %d entries", third.Len())
	}

	c.Close()
	if _, err := c.List(ctx); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("List after Close = %v", err)
	}
}

// Calls end with their context (or the client's timeout) when a holder
// does not answer.
func TestClientTimeouts(t *testing.T) {
	path := sockPath(t)
	os.MkdirAll(strings.TrimSuffix(path, "/fdstore.sock"), 0o700)
	mute, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Close()
	go func() {
		for {
			c, err := mute.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	tests := []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
		want error
	}{
		{"deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 200*time.Millisecond)
		}, context.DeadlineExceeded},
		{"cancel", func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(200*time.Millisecond, cancel)
			return ctx, cancel
		}, context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := tt.ctx()
			defer cancel()
			start := time.Now()
			_, err := Dial(ctx, path)
			if !errors.Is(err, tt.want) || time.Since(start) > 2*time.Second {
				t.Fatalf("Dial = %v after %v, want %v", err, time.Since(start), tt.want)
			}
		})
	}
}

// Start's handling of what it finds at the path.
func TestStartPath(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string) func() // returns a check of what stays
		wantErr string
	}{
		{"nothing", func(t *testing.T, path string) func() { return nil }, ""},
		{"stale socket", func(t *testing.T, path string) func() {
			os.MkdirAll(strings.TrimSuffix(path, "/fdstore.sock"), 0o700)
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
			return nil
		}, ""},
		{"regular file", func(t *testing.T, path string) func() {
			os.MkdirAll(strings.TrimSuffix(path, "/fdstore.sock"), 0o700)
			os.WriteFile(path, []byte("precious"), 0o600)
			return func() {
				if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
					t.Errorf("file at the path changed: %q, %v", b, err)
				}
			}
		}, "not a socket"},
		{"another protocol", func(t *testing.T, path string) func() {
			os.MkdirAll(strings.TrimSuffix(path, "/fdstore.sock"), 0o700)
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
					c.Close()
				}
			}()
			before, _ := statID(path)
			return func() {
				if after, err := statID(path); err != nil || after != before {
					t.Errorf("socket at the path replaced")
				}
			}
		}, "answers but not as a holder"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := sockPath(t)
			check := tt.prepare(t, path)
			s, err := Start(t.Context(), Config{Path: path, Logger: testLogger(t), TakeoverTimeout: 5 * time.Second})
			if s != nil {
				defer s.Close()
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if _, err := dial(t, path).List(t.Context()); err != nil {
					t.Fatal(err)
				}
			} else if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Start = %v, want %q", err, tt.wantErr)
			}
			if check != nil {
				check()
			}
		})
	}
}

// Close closes every held fd and removes the socket.
func TestCloseReleases(t *testing.T) {
	srv, path := startServer(t, Config{})
	c := dial(t, path)
	ln := listenTCP(t)
	addr := ln.Addr().String()
	if err := c.Put(t.Context(), "k", ln); err != nil {
		t.Fatal(err)
	}
	ln.Close()
	srv.Close()
	if _, err := net.DialTimeout("tcp", addr, time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("held socket survives Close: %v", err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file after Close: %v", err)
	}
	if err := c.Put(t.Context(), "k", listenTCP(t)); err == nil {
		t.Fatal("Put after the holder closed succeeded")
	}
}
