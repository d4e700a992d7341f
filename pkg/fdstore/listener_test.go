package fdstore

import (
	"context"
	"errors"
	"math"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/warren-mesh/warren/internal/testenv"
	"golang.org/x/sys/unix"
)

func TestKey(t *testing.T) {
	tests := []struct {
		key     string
		cookie  uint64
		name    string
		wantErr bool
	}{
		{key: Key(1, "hbone"), cookie: 1, name: "hbone"},
		{key: Key(math.MaxUint64, "outbound4"), cookie: math.MaxUint64, name: "outbound4"},
		{key: Key(4096, "a/b"), cookie: 4096, name: "a/b"},
		{key: "netns/12/", wantErr: true},
		{key: "netns/12", wantErr: true},
		{key: "netns//x", wantErr: true},
		{key: "netns/012/x", wantErr: true},
		{key: "netns/-1/x", wantErr: true},
		{key: "netns/18446744073709551616/x", wantErr: true},
		{key: "pod/12/x", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			c, n, err := ParseKey(tt.key)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseKey = %d %q %v, want error %v", c, n, err, tt.wantErr)
			}
			if err == nil && (c != tt.cookie || n != tt.name || Key(c, n) != tt.key) {
				t.Fatalf("ParseKey = %d %q, want %d %q", c, n, tt.cookie, tt.name)
			}
		})
	}
	if !strings.HasPrefix(Key(5, "x"), NetnsPrefix(5)) || strings.HasPrefix(Key(55, "x"), NetnsPrefix(5)) {
		t.Error("NetnsPrefix does not separate namespaces")
	}
}

func TestListenerFromFD(t *testing.T) {
	file := func(t *testing.T, c interface{ File() (*os.File, error) }) *os.File {
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	tests := []struct {
		name    string
		open    func(t *testing.T) *os.File
		wantErr string
	}{
		{"tcp4 listener", func(t *testing.T) *os.File { return file(t, listenTCP(t)) }, ""},
		{"tcp6 listener", func(t *testing.T) *os.File {
			ln, err := net.Listen("tcp6", "[::1]:0")
			if err != nil {
				t.Skipf("no IPv6 loopback: %v", err)
			}
			defer ln.Close()
			return file(t, ln.(*net.TCPListener))
		}, ""},
		{"plain TCP listener (not MPTCP)", func(t *testing.T) *os.File {
			f, _ := listenBacklog(t, 1)
			return f
		}, ""},
		{"tcp socket not listening", func(t *testing.T) *os.File {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			return os.NewFile(uintptr(fd), "unbound")
		}, "not in LISTEN"},
		{"tcp connection", func(t *testing.T) *os.File {
			ln := listenTCP(t)
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			return file(t, c.(*net.TCPConn))
		}, "not in LISTEN"},
		{"udp socket", func(t *testing.T) *os.File {
			c, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			return file(t, c.(*net.UDPConn))
		}, "not SOCK_STREAM"},
		{"unix listener", func(t *testing.T) *os.File {
			ln, err := net.Listen("unix", t.TempDir()+"/s")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			return file(t, ln.(*net.UnixListener))
		}, "not AF_INET"},
		{"pipe", func(t *testing.T) *os.File {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			w.Close()
			return r
		}, "SO_TYPE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.open(t)
			defer f.Close()
			ln, err := ListenerFromFD(f)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				ln.Close()
				return
			}
			if !errors.Is(err, ErrNotListener) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ListenerFromFD = %v, want ErrNotListener with %q", err, tt.wantErr)
			}
		})
	}
}

func TestNetnsCookie(t *testing.T) {
	ln := listenTCP(t)
	c1, err := NetnsCookieOfConn(ln)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := NetnsCookieOf(fd)
	unix.Close(fd)
	if err != nil || c1 == 0 || c1 != c2 {
		t.Fatalf("cookies %d, %d, %v: want one nonzero cookie per namespace", c1, c2, err)
	}
	if _, err := NetnsCookieOf(-1); err == nil {
		t.Error("cookie of fd -1")
	}

	t.Run("other namespace", func(t *testing.T) {
		testenv.RequireRoot(t)
		other := socketInNewNetns(t)
		defer unix.Close(other)
		c3, err := NetnsCookieOf(other)
		if err != nil || c3 == c1 {
			t.Fatalf("cookie in a new namespace %d (%v), here %d", c3, err, c1)
		}
	})
}

// socketInNewNetns opens a TCP listener in a fresh network namespace. The
// thread that made the namespace is never unlocked, so the runtime drops it.
func socketInNewNetns(t *testing.T) int {
	t.Helper()
	type res struct {
		fd  int
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- res{-1, err}
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			err = unix.Listen(fd, 8)
		}
		ch <- res{fd, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.fd
}

// The agent's view: listeners by namespace cookie and name.
func TestListenerStore(t *testing.T) {
	_, path := startServer(t, Config{})
	st := &ListenerStore{Client: dial(t, path), Timeout: 2 * time.Second}
	ln := listenTCP(t)
	cookie, err := NetnsCookieOfConn(ln)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := st.Take(cookie, "inbound"); got != nil || err != nil {
		t.Fatalf("Take of nothing = %v, %v; want nil, nil", got, err)
	}
	if err := st.Keep(cookie, "inbound", ln); err != nil {
		t.Fatal(err)
	}
	if err := st.Keep(cookie+1, "inbound", ln); err == nil || !strings.Contains(err.Error(), "belongs to netns") {
		t.Fatalf("Keep under another namespace's key = %v", err)
	}
	got, err := st.Take(cookie, "inbound")
	if err != nil || got == nil || got.Addr().String() != ln.Addr().String() {
		t.Fatalf("Take = %v, %v", got, err)
	}
	got.Close()

	// A held socket that does not fit its key is an error, not a listener.
	c := st.Client
	if err := c.Put(t.Context(), Key(cookie+1, "wrong-ns"), ln); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Take(cookie+1, "wrong-ns"); err == nil || !strings.Contains(err.Error(), "belongs to netns") {
		t.Fatalf("Take of another namespace's socket = %v", err)
	}
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	if err := c.Put(t.Context(), Key(cookie, "udp"), udp.(*net.UDPConn)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Take(cookie, "udp"); !errors.Is(err, ErrNotListener) {
		t.Fatalf("Take of a UDP socket = %v", err)
	}
	if err := c.Put(t.Context(), "not-a-netns-key", ln); err != nil {
		t.Fatal(err)
	}

	cookies, err := st.Cookies()
	if err != nil || !slices.Equal(cookies, []uint64{cookie, cookie + 1}) && !slices.Equal(cookies, []uint64{cookie + 1, cookie}) {
		t.Fatalf("Cookies = %v, %v", cookies, err)
	}
	if err := st.Forget(cookie); err != nil {
		t.Fatal(err)
	}
	keys, err := c.List(t.Context())
	if err != nil || !slices.Equal(keys, []string{Key(cookie+1, "wrong-ns"), "not-a-netns-key"}) {
		t.Fatalf("after Forget: %q, %v", keys, err)
	}
}

// lockFile waits for the lock with back-off, and gives up with its context.
func TestLockFile(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		path := t.TempDir() + "/lock"
		unlock, err := lockFile(t.Context(), path)
		if err != nil {
			t.Fatal(err)
		}

		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		start := time.Now()
		_, err = lockFile(ctx, path)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) != time.Second {
			t.Fatalf("lockFile while held = %v after %v, want deadline after 1s", err, time.Since(start))
		}

		go func() {
			time.Sleep(2 * time.Second)
			unlock()
		}()
		start = time.Now()
		unlock2, err := lockFile(t.Context(), path)
		took := time.Since(start)
		if err != nil || took < 2*time.Second || took > 2*time.Second+backoff(100) {
			t.Fatalf("lockFile = %v after %v, want the lock within one back-off of 2s", err, took)
		}
		unlock2()
	})
}

func TestBackoff(t *testing.T) {
	tests := []struct {
		attempt int
		want    time.Duration
	}{
		{0, 10 * time.Millisecond},
		{1, 20 * time.Millisecond},
		{5, 320 * time.Millisecond},
		{6, 500 * time.Millisecond},
		{1000, 500 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := backoff(tt.attempt); got != tt.want {
			t.Errorf("backoff(%d) = %v, want %v", tt.attempt, got, tt.want)
		}
	}
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 15*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := sleepCtx(ctx, backoff(0)); err != nil || time.Since(start) != 10*time.Millisecond {
			t.Fatalf("sleepCtx = %v after %v", err, time.Since(start))
		}
		if err := sleepCtx(ctx, backoff(0)); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) != 15*time.Millisecond {
			t.Fatalf("sleepCtx past the deadline = %v after %v", err, time.Since(start))
		}
	})
}
