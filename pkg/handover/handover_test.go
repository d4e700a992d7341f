package handover

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestHelloReadyGone(t *testing.T) {
	dir := t.TempDir()
	type ev struct {
		op        string
		pid, pods int
	}
	events := make(chan ev, 10)
	srv, err := Listen(dir, 100, Events{
		Hello: func(pid int) { events <- ev{"hello", pid, 0} },
		Ready: func(pid, pods int) { events <- ev{"ready", pid, pods} },
		Gone:  func(pid int) { events <- ev{"gone", pid, 0} },
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if fi, err := os.Stat(srv.Path()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v mode %v", err, fi)
	}
	select {
	case <-srv.SuccessorReady():
		t.Fatal("ready before any successor")
	default:
	}
	// A stale socket of a dead agent is removed by the successor's scan.
	stale := SocketPath(dir, 99)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()

	a := NewAnnouncer(dir, 200, nil)
	pids, err := a.Hello(context.Background())
	if err != nil || len(pids) != 1 || pids[0] != 100 {
		t.Fatalf("Hello = %v, %v", pids, err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale socket not removed: %v", err)
	}
	want := func(w ev) {
		t.Helper()
		select {
		case got := <-events:
			if got != w {
				t.Fatalf("event %+v, want %+v", got, w)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no event, want %+v", w)
		}
	}
	want(ev{"hello", 200, 0})
	a.Ready(3)
	a.Ready(3) // unchanged: not sent again
	a.Ready(4)
	want(ev{"ready", 200, 3})
	want(ev{"ready", 200, 4})
	<-srv.SuccessorReady()
	if pid, pods, ok := srv.Successor(); !ok || pid != 200 || pods != 4 {
		t.Errorf("Successor = %d %d %v", pid, pods, ok)
	}
	a.Close()
	want(ev{"gone", 200, 0})
	if _, _, ok := srv.Successor(); ok {
		t.Error("a gone successor is still ready")
	}
	select {
	case <-srv.SuccessorReady():
		t.Error("SuccessorReady stays closed after the successor left")
	default:
	}
}

func TestBadMessagesCloseOnlyThatConnection(t *testing.T) {
	dir := t.TempDir()
	srv, err := Listen(dir, 100, Events{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	for _, line := range []string{"garbage\n", `{"op":"ready","pid":0}` + "\n", `{"op":"explode","pid":5}` + "\n", string(make([]byte, 2*maxLine)) + "\n"} {
		c, err := net.Dial("unix", srv.Path())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(line))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("%.20q: connection still open", line)
		}
		c.Close()
	}
	// Still serving.
	a := NewAnnouncer(dir, 300, nil)
	defer a.Close()
	if pids, err := a.Hello(context.Background()); err != nil || len(pids) != 1 {
		t.Fatalf("Hello after bad input = %v, %v", pids, err)
	}
	a.Ready(1)
	select {
	case <-srv.SuccessorReady():
	case <-time.After(5 * time.Second):
		t.Fatal("not ready")
	}
}

func TestCloseRemovesSocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	srv, err := Listen(dir, 7, Events{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state dir %v %v", fi, err)
	}
	srv.Close()
	if _, err := os.Stat(SocketPath(dir, 7)); !os.IsNotExist(err) {
		t.Errorf("socket left after Close: %v", err)
	}
}
