package ztunnel

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/loader"
)

// The timed paths run in a synctest bubble: fake time advances only when
// every goroutine of the bubble waits, so the waits below take no real
// time and their lengths are exact. Nothing in these tests blocks on a
// socket (which would stop fake time).

// TestRetryFailedSetup: a workload whose setup failed is tried again every
// RetryInterval, not before.
func TestRetryFailedSetup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBed(t, bedOpts{noRun: true})
		b.net.openErr = func(path string) error { return errors.New("not there yet") }
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- b.p.Run(ctx) }()
		b.publish(nil)
		synctest.Wait()
		if n := b.net.openCount("/fake/server"); n != 1 {
			t.Fatalf("setup tried %d times at once, want 1", n)
		}
		if err := b.p.Ready(); err == nil || !strings.Contains(err.Error(), "workload default/server-7d9f (server): open netns /fake/server: not there yet") {
			t.Errorf("Ready: %v", err)
		}
		time.Sleep(5*time.Second - time.Nanosecond)
		synctest.Wait()
		if n := b.net.openCount("/fake/server"); n != 1 {
			t.Errorf("setup tried %d times before the retry interval, want 1", n)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if n := b.net.openCount("/fake/server"); n != 2 {
			t.Errorf("setup tried %d times after the retry interval, want 2", n)
		}
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if n := b.net.openCount("/fake/server"); n != 3 {
			t.Errorf("setup tried %d times after two intervals, want 3", n)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// TestCertTimeout: a certificate that does not come within CertTimeout
// fails the setup then, releasing what it took.
func TestCertTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBed(t, bedOpts{noRun: true})
		b.certs.acquire = func(ctx context.Context, _ identity.Identity) error {
			<-ctx.Done()
			return ctx.Err()
		}
		w, _ := b.publish(nil).WorkloadByUID("server")
		start := time.Now()
		b.p.addWorkload(context.Background(), w)
		if d := time.Since(start); d != 30*time.Second {
			t.Errorf("setup gave up after %v, want the default CertTimeout, 30s", d)
		}
		if err := b.p.Ready(); err == nil || !strings.Contains(err.Error(), "certificate for "+serverID+": context deadline exceeded") {
			t.Errorf("Ready: %v", err)
		}
		if n := b.certs.holds(serverID); n != 0 {
			t.Errorf("certificate held %d times after the timeout, want 0", n)
		}
		if !b.net.current("/fake/server").isClosed() {
			t.Error("namespace left open")
		}
	})
}

// TestTunnelConnectTimeout: a tunnel whose TCP connect to the HBONE port
// never completes fails after tunnelConnectTimeout with NETWORK_POLICY,
// through the real pool and DialTunnel.
func TestTunnelConnectTimeout(t *testing.T) {
	// A client connection to hand to the handler, made before the bubble:
	// the handler only resets it, which never blocks.
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	accepted, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	synctest.Test(t, func(t *testing.T) {
		b := newBed(t, bedOpts{noRun: true})
		snap := b.publish(nil)
		w, _ := snap.WorkloadByUID("client")
		ns, err := b.net.Open("/fake/client")
		if err != nil {
			t.Fatal(err)
		}
		// The client pod as setup leaves it, without its listeners.
		pd := &pod{proxy: b.p, id: mustIdentity(t, clientID), ns: ns}
		pd.setWorkload(w)
		b.p.byIP[b.ip(11)] = pd
		b.net.blackhole(b.ap(12, loader.DefaultHBONEPort))
		b.capture.setOrig(unmap(accepted.RemoteAddr().(*net.TCPAddr).AddrPort()), b.ap(12, 9000), nil)

		start := time.Now()
		b.p.handleOutbound(pd, accepted)
		if d := time.Since(start); d != tunnelConnectTimeout {
			t.Errorf("the tunnel failed after %v, want %v", d, tunnelConnectTimeout)
		}
		checkLog(t, b.logs.next(t), map[string]string{"response_flags": "NETWORK_POLICY",
			"error": "HBONE to " + b.ap(12, 9000).String() + "...connect to the HBONE port timed out (is a network policy blocking it?): ...context deadline exceeded..."})
		b.checkMetrics(failedOnly(lbl("source", l(srcClient, dstServer, mtls, flags("NETWORK_POLICY"))...)))
	})
	refused(t, client)
}

// TestDrainDeadlineInBubble: Shutdown waits for its context and no longer,
// with nothing open it returns at once.
func TestDrainDeadlineInBubble(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBed(t, bedOpts{noRun: true})
		start := time.Now()
		if err := b.p.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown with nothing open: %v", err)
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("Shutdown with nothing open took %v", d)
		}
		// A handler still running (a relay over an in-memory pipe): the
		// deadline resets it.
		a, c := net.Pipe()
		defer c.Close()
		b.p.mu.Lock()
		b.p.closing = false
		b.p.mu.Unlock()
		if !b.p.track() {
			t.Fatal("track refused")
		}
		pd := &pod{proxy: b.p}
		tr := &tracked{pod: pd, end: a}
		b.p.trackConn(tr)
		go func() {
			defer b.p.wg.Done()
			buf := make([]byte, 1)
			_, err := a.Read(buf) // ends when revoked
			b.p.untrack(tr)
			if err == nil {
				t.Error("the relay's read ended without an error")
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		start = time.Now()
		err := b.p.Shutdown(ctx)
		if d := time.Since(start); d != 30*time.Second {
			t.Errorf("Shutdown returned after %v, want the 30s deadline", d)
		}
		if err == nil || !strings.Contains(err.Error(), "1 connection(s) open") {
			t.Errorf("Shutdown: %v", err)
		}
		if why := tr.why.Load(); why == nil || why.err != errRevokedDrain {
			t.Errorf("revoked with %v, want the drain", why)
		}
		if b.p.track() {
			t.Error("a shut-down proxy still takes connections")
		}
	})
}

func mustIdentity(t testing.TB, s string) identity.Identity {
	t.Helper()
	id, err := identity.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
