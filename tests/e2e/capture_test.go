package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/warren-mesh/warren/pkg/loader"
	"github.com/warren-mesh/warren/tests/lab"
)

// forwarder is a toy stand-in for the agent's listeners in one pod: it accepts
// captured connections on 15001 (outbound) and 15006 (inbound), records what
// the loader says their original destination was, and forwards them as plain
// TCP from inside the pod with the agent's mark. It proves capture on the lab
// without the tunnel.
type forwarder struct {
	t   *testing.T
	pod *lab.Pod
	ldr *loader.Loader

	mu       sync.Mutex
	outbound []netip.AddrPort // original destinations seen on 15001
	inbound  []netip.AddrPort // local addresses seen on 15006
}

func newForwarder(t *testing.T, pod *lab.Pod, ldr *loader.Loader) (*forwarder, net.Listener) {
	f := &forwarder{t: t, pod: pod, ldr: ldr}
	var lns []net.Listener
	var in net.Listener
	err := pod.Do(func() error {
		for _, addr := range []string{"127.0.0.1:15001", "[::1]:15001"} {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		// Go listens with MPTCP by default; sk_lookup steers to plain TCP sockets only.
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		in, err = lc.Listen(context.Background(), "tcp", ":15006")
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", pod.Name(), err)
	}
	for _, ln := range lns {
		go f.serve(ln, true)
	}
	go f.serve(in, false)
	t.Cleanup(func() {
		for _, ln := range append(lns, in) {
			ln.Close()
		}
	})
	return f, in
}

func (f *forwarder) serve(ln net.Listener, outbound bool) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go f.handle(c.(*net.TCPConn), outbound)
	}
}

func (f *forwarder) handle(c *net.TCPConn, outbound bool) {
	defer c.Close()
	var dst netip.AddrPort
	if outbound {
		var err error
		if dst, err = f.ldr.OriginalDst(c); err != nil {
			f.t.Errorf("original dst of %s: %v", c.RemoteAddr(), err)
			return
		}
	} else {
		dst = unmap(c.LocalAddr().(*net.TCPAddr).AddrPort())
	}
	f.mu.Lock()
	if outbound {
		f.outbound = append(f.outbound, dst)
	} else {
		f.inbound = append(f.inbound, dst)
	}
	f.mu.Unlock()
	var up net.Conn
	err := f.pod.Do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, Control: markSocket}
		up, err = d.Dial("tcp", dst.String())
		return err
	})
	if err != nil {
		return
	}
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(up, c)
		up.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(c, up)
	c.CloseWrite()
	<-done
}

func (f *forwarder) seen() (out, in []netip.AddrPort) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]netip.AddrPort(nil), f.outbound...), append([]netip.AddrPort(nil), f.inbound...)
}

func markSocket(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, loader.Mark)
	}); err != nil {
		return err
	}
	return serr
}

// whoami parses labapp whoami's first line: the server's local and remote address.
func whoami(t *testing.T, reply string) (local, remote netip.AddrPort) {
	t.Helper()
	first, _, _ := strings.Cut(reply, "\n")
	f := strings.Fields(first)
	if len(f) != 2 {
		t.Fatalf("whoami reply %q", reply)
	}
	return netip.MustParseAddrPort(f[0]), netip.MustParseAddrPort(f[1])
}

func TestCaptureOnLab(t *testing.T) {
	c := newCluster(t)
	enrolledNode := c.lab.Node("node1")
	ldr, err := loader.Open(loader.Config{CgroupPath: enrolledNode.CgroupRoot(), PinDir: enrolledNode.PinDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ldr.Close()
		if err := loader.Uninstall(enrolledNode.PinDir()); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	enrolled := c.pod("client1") // node1
	fwd, inbound := newForwarder(t, enrolled, ldr)
	if _, err := ldr.Enroll(enrolled.NetNSPath(), loader.EnrollOptions{Inbound: inbound.(*net.TCPListener)}); err != nil {
		t.Fatal(err)
	}
	server := c.pod("server2") // node2, not enrolled
	c.serve(t, server, "whoami", "-l", ":8080")
	c.serve(t, enrolled, "whoami", "-l", ":8080")
	hbone := listenIn(t, enrolled, ":15008")
	before, err := ldr.Stats()
	if err != nil {
		t.Fatal(err)
	}

	t.Run("outbound across nodes", func(t *testing.T) {
		for i, dst := range []netip.Addr{server.IPv4(), server.IPv6()} {
			addr := netip.AddrPortFrom(dst, 8080)
			r := c.probe(t, enrolled, addr, "out")
			local, remote := whoami(t, r.Reply)
			if local != addr {
				t.Errorf("server local address %s, want %s", local, addr)
			}
			// The forwarder dialed from inside the pod: the server sees the pod's own address.
			if want := enrolled.IPv4(); dst.Is6() {
				if remote.Addr() != enrolled.IPv6() {
					t.Errorf("server saw %s, want the pod's %s", remote, enrolled.IPv6())
				}
			} else if remote.Addr() != want {
				t.Errorf("server saw %s, want the pod's %s", remote, want)
			}
			// The app's connection ended on the loopback listener (the
			// forwarder saw it, below), yet getpeername answers what it dialed.
			if got := netip.MustParseAddrPort(r.Remote); netip.AddrPortFrom(got.Addr().Unmap(), got.Port()) != addr {
				t.Errorf("client's peer %s, want the original destination %s", r.Remote, addr)
			}
			out, _ := fwd.seen()
			if len(out) != i+1 || out[i] != addr {
				t.Fatalf("forwarder saw original destinations %v, want ...%s", out, addr)
			}
		}
	})

	t.Run("non-enrolled pod untouched", func(t *testing.T) {
		other := c.pod("client2")
		out0, _ := fwd.seen()
		addr := netip.AddrPortFrom(server.IPv4(), 8080)
		r := c.probe(t, other, addr, "direct")
		if r.Remote != addr.String() {
			t.Errorf("non-enrolled client's peer %s, want %s", r.Remote, addr)
		}
		if _, remote := whoami(t, r.Reply); remote.Addr() != other.IPv4() {
			t.Errorf("server saw %s, want %s", remote, other.IPv4())
		}
		if out, _ := fwd.seen(); len(out) != len(out0) {
			t.Errorf("a non-enrolled pod's connection was captured: %v", out)
		}
	})

	t.Run("inbound to enrolled pod", func(t *testing.T) {
		for i, dst := range []netip.Addr{enrolled.IPv4(), enrolled.IPv6()} {
			addr := netip.AddrPortFrom(dst, 8080)
			r := c.probe(t, server, addr, "in")
			local, _ := whoami(t, r.Reply)
			if local != addr {
				t.Errorf("app local address %s, want %s", local, addr)
			}
			_, in := fwd.seen()
			if len(in) != i+1 || in[i] != addr {
				t.Fatalf("inbound listener saw %v, want ...%s", in, addr)
			}
		}
	})

	t.Run("hbone port never captured", func(t *testing.T) {
		_, in0 := fwd.seen()
		addr := netip.AddrPortFrom(enrolled.IPv4(), 15008)
		r := c.probe(t, server, addr, "hbone")
		if r.Reply != "hbone" {
			t.Errorf("15008 listener echoed %q", r.Reply)
		}
		if got := <-hbone; got != addr {
			t.Errorf("15008 listener accepted on %s, want %s", got, addr)
		}
		if _, in := fwd.seen(); len(in) != len(in0) {
			t.Errorf("a connection to 15008 was steered inbound: %v", in)
		}
	})

	after, err := ldr.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Captured - before.Captured; got != 2 {
		t.Errorf("captured counter rose by %d, want 2", got)
	}
	if got := after.InboundCaptured - before.InboundCaptured; got != 2 {
		t.Errorf("inbound captured counter rose by %d, want 2", got)
	}
	if after.Errors() != 0 {
		t.Errorf("error counters: %+v", after)
	}

	// Unenroll: the pod's connections go straight out again.
	cookie, err := loader.CookieOf(enrolled.NetNSPath())
	if err != nil {
		t.Fatal(err)
	}
	if err := ldr.Unenroll(cookie); err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(server.IPv4(), 8080)
	if r := c.probe(t, enrolled, addr, "after"); r.Remote != addr.String() {
		t.Errorf("after unenroll the client's peer is %s, want %s", r.Remote, addr)
	}
}

// listenIn echoes on addr inside pod and reports each accepted connection's local address.
func listenIn(t *testing.T, pod *lab.Pod, addr string) <-chan netip.AddrPort {
	var ln net.Listener
	if err := pod.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan netip.AddrPort, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) || err != nil {
				return
			}
			ch <- unmap(c.LocalAddr().(*net.TCPAddr).AddrPort())
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ch
}

// unmap turns a dual-stack socket's IPv4-mapped address into plain IPv4.
func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }
