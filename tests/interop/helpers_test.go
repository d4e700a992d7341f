// Package interop tests warren's HBONE against independent implementations:
// Istio's Go pkg/hbone, Debian's nghttpx (with tinyproxy) and nghttp, and a
// python3-h2 peer. It is its own Go module so that Istio's dependency tree
// stays out of the product's go.mod.
package interop

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/internal/testpki"
	"github.com/warren-mesh/warren/pkg/hbone"
)

const (
	trustDomain = "cluster.local"
	streams     = 50
)

type pki struct {
	ca     *testpki.CA
	client *testpki.SVID
	server *testpki.SVID
}

func newPKI(t testing.TB) *pki {
	ca := testpki.NewCA(t, trustDomain)
	return &pki{ca: ca, client: ca.IssueWorkload(t, "client-ns", "client-sa"), server: ca.IssueWorkload(t, "server-ns", "server-sa")}
}

func (p *pki) clientTLS() hbone.ClientTLS {
	return hbone.SPIFFEClientTLS{
		SVID: func(src spiffeid.ID) (x509svid.Source, error) {
			if src != p.client.ID {
				return nil, errors.New("unknown identity")
			}
			return p.client, nil
		},
		Bundles: p.ca.Bundle(),
	}
}

// files writes the CA root and an SVID as PEM files for non-Go peers.
func (p *pki) files(t testing.TB, svid *testpki.SVID) (caFile, certFile, keyFile string) {
	dir := t.TempDir()
	certPEM, keyPEM, err := svid.X509.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.ca.Root().Raw})
	caFile, certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for f, b := range map[string][]byte{caFile: caPEM, certFile: certPEM, keyFile: keyPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return caFile, certFile, keyFile
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startEcho runs a TCP echo server on loopback that half-closes after its input ends.
func startEcho(t testing.TB) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.CopyBuffer(c, c, make([]byte, 64<<10))
				c.(*net.TCPConn).CloseWrite()
				io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// startSink runs a TCP server that discards its input and reports the
// byte count of each connection on the returned channel, for benchmarks.
func startSink(t testing.TB) (netip.AddrPort, <-chan int64) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	done := make(chan int64, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
				done <- n
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort(), done
}

// checkEcho sends size random bytes over c and checks the sha256 of what
// comes back. halfClose sends EOF after the payload and expects EOF back;
// otherwise it reads exactly size bytes.
func checkEcho(c net.Conn, size int, halfClose bool) error {
	msg := make([]byte, size)
	rand.Read(msg)
	want := sha256.Sum256(msg)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil && halfClose {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		werr <- err
	}()
	h := sha256.New()
	var err error
	if halfClose {
		_, err = io.Copy(h, c)
	} else {
		_, err = io.CopyN(h, c, int64(size))
	}
	if err != nil {
		return err
	}
	if err := <-werr; err != nil {
		return err
	}
	if got := h.Sum(nil); string(got) != string(want[:]) {
		return errors.New("sha256 mismatch")
	}
	return nil
}

// concurrently runs fn for streams goroutines and reports the first error.
func concurrently(t *testing.T, n int, fn func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(i); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// tool returns the path of a Debian tool, or skips (fails in CI).
func tool(t testing.TB, name string) string {
	p, err := exec.LookPath(name)
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/" + name); err2 == nil {
			return "/usr/sbin/" + name
		}
		testenv.SkipOrFail(t, "%s not installed: run make deps (Debian packages nghttp2-proxy nghttp2-client python3-h2 tinyproxy-bin)", name)
	}
	return p
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// waitListening waits until addr accepts TCP connections.
func waitListening(t testing.TB, addr string, cmd *exec.Cmd) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		if cmd.ProcessState != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never listened on %s", cmd.Path, addr)
}

// startProcess runs cmd, logging its output on failure, and stops it (by PID) at cleanup.
func startProcess(t testing.TB, cmd *exec.Cmd) *syncBuffer {
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(cmd.Path), out.String())
		}
	})
	return out
}

type syncBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	return len(p), nil
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}

func dialCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 20*time.Second)
}

// waitFor polls cond for up to five seconds.
func waitFor(cond func() bool) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}
