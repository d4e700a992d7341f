package fdstore

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain doubles as the agent child of TestAgentKill9.
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(agentChild(os.Getenv(childEnv)))
	}
	os.Exit(m.Run())
}

const childEnv = "FDSTORE_TEST_AGENT_CHILD"

// agentChild plays an agent: it opens a listener, hands it to the holder at
// path, prints the listener's address and waits to be killed.
func agentChild(path string) int {
	ctx := context.Background()
	c, err := Dial(ctx, path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cookie, err := NetnsCookieOfConn(ln.(*net.TCPListener))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	st := &ListenerStore{Client: c}
	if err := st.Keep(cookie, "inbound", ln.(*net.TCPListener)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("%s %d\n", ln.Addr(), cookie)
	select {}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// sockPath returns a socket path in a short fresh directory (sun_path is
// 108 bytes), one level below it so that Start creates the parent.
func sockPath(t testing.TB) string {
	dir, err := os.MkdirTemp("", "fds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "run", "fdstore.sock")
}

func startAt(t testing.TB, path string, cfg Config) *Server {
	t.Helper()
	cfg.Path = path
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func startServer(t testing.TB, cfg Config) (*Server, string) {
	p := sockPath(t)
	return startAt(t, p, cfg), p
}

func dial(t testing.TB, path string) *Client {
	t.Helper()
	c, err := Dial(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func listenTCP(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// listenBacklog opens a loopback TCP listener with an exact backlog.
func listenBacklog(t testing.TB, backlog int) (*os.File, string) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "backlog-listener")
	t.Cleanup(func() { f.Close() })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return f, fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port)
}

// acceptAndEcho accepts one connection on ln, reads want and answers "ok:"+want.
func acceptAndEcho(t testing.TB, ln *net.TCPListener, want string) {
	t.Helper()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.AcceptTCP()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != want {
		t.Fatalf("read %q, %v; want %q", buf, err, want)
	}
	if _, err := c.Write([]byte("ok:" + want)); err != nil {
		t.Fatal(err)
	}
}

// expectEcho reads the answer of acceptAndEcho on c.
func expectEcho(t testing.TB, c net.Conn, sent string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len("ok:"+sent))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ok:"+sent {
		t.Fatalf("answer %q, %v", buf, err)
	}
}

// rawDial connects without greeting.
func rawDial(t testing.TB, path string) *frameConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	fc := newFrameConn(c, MaxReplySize)
	t.Cleanup(func() { fc.close() })
	return fc
}

// readReply reads one reply frame.
func readReply(fc *frameConn) (*reply, []int, error) {
	fc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := fc.readFrame()
	if err != nil {
		return nil, nil, err
	}
	var r reply
	if err := json.Unmarshal(f.body, &r); err != nil {
		closeFDs(f.fds)
		return nil, nil, err
	}
	return &r, f.fds, nil
}

// countFDs is the number of fds this process has open.
func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// waitFor polls cond for up to 5 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readLine reads one line of a child's output.
func readLine(t testing.TB, r io.Reader) string {
	t.Helper()
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		t.Fatalf("child output: %q, %v", line, err)
	}
	return strings.TrimSpace(line)
}
