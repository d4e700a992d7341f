package ztunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/pkg/loader"
)

func TestDialInNamespace(t *testing.T) {
	testenv.RequireRoot(t) // setns needs CAP_SYS_ADMIN, even into our own namespace
	ns, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()

	fd, err := socketIn(ns, netip.MustParseAddr("127.0.0.1"), true)
	if err != nil {
		t.Fatal(err)
	}
	c, err := connect(context.Background(), fd, dst)
	if err != nil {
		t.Fatalf("connect %s: %v", dst, err)
	}
	defer c.Close()
	rc, _ := c.SyscallConn()
	var mark int
	rc.Control(func(fd uintptr) { mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
	if mark != loader.Mark {
		t.Errorf("SO_MARK %#x, want %#x", mark, loader.Mark)
	}
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := srv.Read(buf); err != nil || buf[0] != 'x' {
		t.Fatalf("read %q %v", buf, err)
	}

	// A refused connect is an error, not a connection.
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln2.Addr().(*net.TCPAddr).AddrPort()
	ln2.Close()
	fd, err = socketIn(ns, netip.Addr{}, true)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := connect(ctx, fd, closed); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("connect to a closed port: %v, want ECONNREFUSED", err)
	}
}

// TestHostNetns runs the real namespace handle on the test's own namespace:
// marked, reuse-port listeners; dials from a chosen address; nothing after
// Close. (tcp_migrate_req is left alone: here it is the host's.)
func TestHostNetns(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := (HostNamespaces{}).Open("/nonexistent/netns"); err == nil {
		t.Error("Open of a missing path succeeded")
	}
	ns, err := HostNamespaces{}.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ns.Listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rc, _ := ln.SyscallConn()
	var mark, reuse int
	rc.Control(func(fd uintptr) {
		mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK)
		reuse, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT)
	})
	if mark != loader.Mark || reuse != 1 {
		t.Errorf("listener SO_MARK %#x SO_REUSEPORT %d, want %#x and 1", mark, reuse, loader.Mark)
	}
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, netip.MustParseAddr("127.0.0.2"), dst)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if got := srv.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().String(); got != "127.0.0.2" {
		t.Errorf("dial came from %s, want 127.0.0.2", got)
	}
	srv.Close()
	c.Close()
	if err := ns.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ns.Dial(ctx, netip.Addr{}, dst); !errors.Is(err, errPodGone) {
		t.Errorf("Dial after Close: %v, want errPodGone", err)
	}
	if _, err := ns.Listen(netip.MustParseAddrPort("127.0.0.1:0")); !errors.Is(err, errPodGone) {
		t.Errorf("Listen after Close: %v, want errPodGone", err)
	}
	if err := ns.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
