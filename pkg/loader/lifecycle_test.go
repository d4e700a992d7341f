package loader

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// attached returns how many programs of each attach type sit on the cgroup.
func attachedCgroup(t testing.TB, cgroup string) int {
	t.Helper()
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for _, at := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt} {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatalf("query %s: %v", at, err)
		}
		n += len(r.Programs)
	}
	return n
}

func attachedNetns(t testing.TB, ns *testNS) int {
	t.Helper()
	r, err := link.QueryPrograms(link.QueryOptions{Target: int(ns.h), Attach: ebpf.AttachSkLookup})
	if err != nil {
		t.Fatalf("query sk_lookup: %v", err)
	}
	return len(r.Programs)
}

// linkIDs maps each pinned cgroup link to its link ID and program ID.
func linkIDs(t testing.TB, pinDir string) map[string][2]uint32 {
	t.Helper()
	ids := make(map[string][2]uint32)
	for _, pin := range []string{pinConnect4, pinConnect6, pinSockops, pinGetsockopt} {
		lk, err := link.LoadPinnedLink(filepath.Join(pinDir, pin), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := lk.Info()
		lk.Close()
		if err != nil {
			t.Fatal(err)
		}
		ids[pin] = [2]uint32{uint32(info.ID), uint32(info.Program)}
	}
	return ids
}

func TestRestartNoLapse(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	before := linkIDs(t, e.pinDir)
	if n := attachedCgroup(t, e.cgroup); n != 4 {
		t.Fatalf("%d programs attached at the test cgroup, want 4", n)
	}

	// A second reader, as a new agent beside the old during an upgrade.
	reader, err := Open(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()

	var (
		stop          atomic.Bool
		conns, lapses atomic.Int64
		wg            sync.WaitGroup
		firstErr      error
		firstErrOnce  sync.Once
	)
	fail := func(err error) { firstErrOnce.Do(func() { firstErr = err }) }
	wg.Go(func() {
		deadline := time.Now().Add(10 * time.Second)
		for i := 0; !stop.Load() && i < 20000 && time.Now().Before(deadline); i++ {
			dst := netip.AddrPortFrom(netip.MustParseAddr("198.18.0.10"), uint16(1+i%1000))
			c, local, err := p.ns.dial(dst, dialOpts{})
			if err != nil {
				lapses.Add(1)
				fail(err)
				continue
			}
			var ac accepted
			select {
			case ac = <-p.in4:
			case <-time.After(5 * time.Second):
				lapses.Add(1)
				fail(errors.New("no accept"))
				c.Close()
				continue
			}
			if ac.remote != local {
				fail(errors.New("accepted another connection"))
			}
			got, err := reader.OriginalDst(ac.conn)
			if err != nil || got != dst {
				lapses.Add(1)
				fail(err)
			}
			ac.conn.Close()
			c.Close()
			conns.Add(1)
		}
	})
	for i := range 5 {
		time.Sleep(50 * time.Millisecond)
		if err := e.l.Close(); err != nil {
			t.Fatal(err)
		}
		// A changed configuration, and on every other restart changed
		// programs (the CIDR switch is a load-time constant of connect4/6).
		e.cfg.ExcludePorts = []uint16{uint16(60000 + i)} // never dialled
		e.cfg.ExcludeCIDRs = nil
		if i%2 == 0 {
			e.cfg.ExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("198.19.0.0/16")} // never dialled
		}
		l, err := Open(e.cfg)
		if err != nil {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("reopen %d: %v", i, err)
		}
		e.l = l
		t.Cleanup(func() { l.Close() })
	}
	time.Sleep(50 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	t.Logf("%d connects across 5 restarts, %d lapses", conns.Load(), lapses.Load())
	if lapses.Load() != 0 {
		t.Fatalf("%d lapses, first: %v", lapses.Load(), firstErr)
	}
	if conns.Load() < 100 {
		t.Fatalf("only %d connects", conns.Load())
	}
	after := linkIDs(t, e.pinDir)
	for pin, b := range before {
		a := after[pin]
		if a[0] != b[0] {
			t.Errorf("%s: link %d replaced by %d, want updated in place", pin, b[0], a[0])
		}
		if a[1] == b[1] {
			t.Errorf("%s: program %d not replaced", pin, b[1])
		}
	}
	if n := attachedCgroup(t, e.cgroup); n != 4 {
		t.Fatalf("%d programs attached at the test cgroup after restarts, want 4", n)
	}
}

func TestUninstall(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	inLn := p.ns.listen(t, "tcp", ":15006")
	if _, err := e.l.Enroll(p.ns.path, EnrollOptions{Inbound: inLn}); err != nil {
		t.Fatal(err)
	}
	e.expectCaptured(p, netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{})
	if attachedCgroup(t, e.cgroup) != 4 || attachedNetns(t, p.ns) != 1 {
		t.Fatal("programs not attached")
	}
	// The loader stays open (a running agent): uninstall detaches anyway.
	if err := Uninstall(e.pinDir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin dir remains: %v", err)
	}
	if n := attachedCgroup(t, e.cgroup); n != 0 {
		t.Fatalf("%d programs still attached at the cgroup", n)
	}
	if n := attachedNetns(t, p.ns); n != 0 {
		t.Fatalf("%d sk_lookup programs still attached to the netns", n)
	}
	if c, _, err := p.ns.dial(netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{}); err == nil || !isUnreachable(err) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("connect after uninstall: %v, want ENETUNREACH (not captured)", err)
	}
	if err := Uninstall(e.pinDir); err != nil {
		t.Fatalf("second uninstall: %v", err)
	}
}

func TestUnenroll(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	keep := e.outboundPod("keep")
	inLn := p.ns.listen(t, "tcp", ":15006")
	opts := EnrollOptions{Inbound: inLn, ExemptSources: []netip.Addr{netip.MustParseAddr("198.18.1.1"), netip.MustParseAddr("2001:2::1")}}
	c1, err := e.l.Enroll(p.ns.path, opts)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := e.l.Enroll(p.ns.path, opts) // idempotent
	if err != nil || c2 != c1 {
		t.Fatalf("second enroll: %v, %d vs %d", err, c2, c1)
	}
	var pod wrPod
	if err := e.l.pods.Lookup(uint64(c1), &pod); err != nil {
		t.Fatal(err)
	}
	// An open captured connection leaves a record in wr_orig.
	cl, local, err := p.ns.dial(netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	next(t, p.in4, local)
	if n := e.origCount(uint64(c1)); n != 1 {
		t.Fatalf("%d wr_orig records before unenroll, want 1", n)
	}

	for i := range 2 { // idempotent
		if err := e.l.Unenroll(c1); err != nil {
			t.Fatalf("unenroll %d: %v", i, err)
		}
	}
	if err := e.l.pods.Lookup(uint64(c1), &pod); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatalf("wr_pods still has the pod: %v", err)
	}
	if n := e.origCount(uint64(c1)); n != 0 {
		t.Fatalf("%d wr_orig records after unenroll", n)
	}
	var (
		ek wrExemptKey
		v  uint8
	)
	it := e.l.exempt.Iterate()
	for it.Next(&ek, &v) {
		t.Fatalf("wr_exempt still has %+v", ek)
	}
	var cookie uint64
	if err := e.l.inbound.Lookup(pod.Slot, &cookie); err == nil {
		t.Fatalf("wr_inbound slot %d still holds socket %d", pod.Slot, cookie)
	}
	if _, err := os.Stat(e.l.netnsPin(c1)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("netns link still pinned: %v", err)
	}
	if n := attachedNetns(t, p.ns); n != 0 {
		t.Fatalf("%d sk_lookup programs still attached", n)
	}
	if c, _, err := p.ns.dial(netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{}); err == nil || !isUnreachable(err) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("connect after unenroll: %v, want ENETUNREACH", err)
	}
	// The other pod is untouched.
	e.expectCaptured(keep, netip.MustParseAddrPort("198.18.0.11:80"), dialOpts{})
	// And the pod can come back.
	if _, err := e.l.Enroll(p.ns.path, opts); err != nil {
		t.Fatal(err)
	}
	e.expectCaptured(p, netip.MustParseAddrPort("198.18.0.12:80"), dialOpts{})
}

func (e *env) origCount(netns uint64) int {
	var (
		k wrTuple
		v wrDst
		n int
	)
	it := e.l.orig.Iterate()
	for it.Next(&k, &v) {
		if k.Netns == netns {
			n++
		}
	}
	if err := it.Err(); err != nil {
		e.t.Fatal(err)
	}
	return n
}

func TestOrigRemovedOnClose(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")

	// The client writes and closes at once (fire and forget): its record
	// must outlive it until the agent has read it.
	dst := netip.MustParseAddrPort("198.18.0.10:80")
	c, local, err := p.ns.dial(dst, dialOpts{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	time.Sleep(20 * time.Millisecond)
	ac := next(t, p.in4, local)
	if got, err := e.l.OriginalDst(ac); err != nil || got != dst {
		t.Fatalf("original dst after client close: %s, %v", got, err)
	}
	if n := e.origCount(uint64(p.cookie)); n != 1 {
		t.Fatalf("%d records, want 1", n)
	}
	ac.Close()
	deadline := time.Now().Add(2 * time.Second)
	for e.origCount(uint64(p.cookie)) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("record not removed after the agent's side closed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	s, err := e.l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.OrigAdded != 1 || s.OrigRemoved != 1 {
		t.Fatalf("stats %+v: want 1 added, 1 removed", s)
	}
}

// TestOpenForgetsDeadNetns: a pod deleted while no agent ran leaves a defunct
// sk_lookup link; the next Open unenrolls it instead of failing.
func TestOpenForgetsDeadNetns(t *testing.T) {
	e := newEnv(t, Config{})
	live := e.outboundPod("live")
	dead := e.newNS("dead")
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	var ln net.Listener
	if err := dead.do(func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp", ":15006")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	cookie, err := e.l.Enroll(dead.path, EnrollOptions{Inbound: ln.(*net.TCPListener)})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := e.l.Enrolled(); err != nil || !slices.Contains(got, cookie) || !slices.Contains(got, live.cookie) {
		t.Fatalf("enrolled %v, %v; want %d and %d", got, err, cookie, live.cookie)
	}
	e.l.Close()
	// Delete the namespace: its last references are the listener and the handle.
	ln.Close()
	if err := dead.remove(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := Open(e.cfg)
		if err != nil {
			t.Fatalf("open with a dead netns enrolled: %v", err)
		}
		got, err := l.Enrolled()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(got, cookie) {
			if !slices.Contains(got, live.cookie) {
				t.Fatal("the live pod was unenrolled too")
			}
			if _, err := os.Stat(l.netnsPin(cookie)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("dead netns link still pinned: %v", err)
			}
			e.l = l
			t.Cleanup(func() { l.Close() })
			break
		}
		l.Close()
		if time.Now().After(deadline) {
			t.Fatal("dead netns still enrolled after 5 s of reopening")
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.expectCaptured(live, netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{})
}

// TestUnenrollDropsPending: a captured connect that never reached
// ESTABLISHED (refused: no listener) leaves a wr_pending entry, which the
// LRU would age out; Unenroll removes it at once.
func TestUnenrollDropsPending(t *testing.T) {
	e := newEnv(t, Config{})
	ns := e.newNS("nolisten")
	cookie, err := e.l.Enroll(ns.path, EnrollOptions{OutboundPort: 15099})
	if err != nil {
		t.Fatal(err)
	}
	if c, _, err := ns.dial(netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{}); err == nil {
		c.Close()
		t.Fatal("connect succeeded without a listener")
	}
	count := func() int {
		var (
			n   int
			key uint64
			v   wrPend
		)
		it := e.l.pending.Iterate()
		for it.Next(&key, &v) {
			if v.Netns == uint64(cookie) {
				n++
			}
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := count(); n != 1 {
		t.Fatalf("%d pending entries for the refused connect, want 1", n)
	}
	if err := e.l.Unenroll(cookie); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 0 {
		t.Fatalf("%d pending entries after unenroll", n)
	}
}
