package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// sink is an upstream that discards what it reads and reports totals.
type sink struct {
	addr netip.AddrPort
	done chan int64
}

func startSink(b testing.TB) *sink {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s := &sink{addr: ln.Addr().(*net.TCPAddr).AddrPort(), done: make(chan int64, 16)}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
				s.done <- n
			}()
		}
	}()
	return s
}

const benchChunk = 1 << 20

// BenchmarkBulk measures single-stream upload throughput over loopback,
// client → server → upstream sink. "hbone" tunnels through warren's HBONE;
// "tls" is the same relay with plain crypto/tls instead (same certificate,
// TLS 1.3 with the suite Go picks, AES-128-GCM here). One op is 1 MiB, so
// allocs/op is allocations per MiB moved.
func BenchmarkBulk(b *testing.B) {
	b.Run("hbone", func(b *testing.B) {
		e := newEnv(b, envOpts{})
		sk := startSink(b)
		p := e.pool(b, Params{})
		r := e.request()
		r.Authority = sk.addr
		s := dial(b, p, r)
		benchUpload(b, s, sk)
	})
	b.Run("tls", func(b *testing.B) {
		e := newEnv(b, envOpts{})
		sk := startSink(b)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		srvCfg := ServerTLSConfig(e.serverSVID.X509, e.ca.Bundle(), e.ca.TrustDomain())
		srvCfg.NextProtos = nil
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := tls.Server(c, srvCfg)
			up, err := net.Dial("tcp", sk.addr.String())
			if err != nil {
				tc.Close()
				return
			}
			Relay(tc, up)
		}()
		cliCfg := harden(tlsconfig.MTLSClientConfig(e.client, e.ca.Bundle(), tlsconfig.AuthorizeAny()))
		cliCfg.NextProtos = nil
		c, err := tls.Dial("tcp", ln.Addr().String(), cliCfg)
		if err != nil {
			b.Fatal(err)
		}
		benchUpload(b, c, sk)
	})
}

func benchUpload(b *testing.B, c net.Conn, sk *sink) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ReportAllocs()
	cpu0, w0 := cpuTime(), writeSyscalls()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	if n := <-sk.done; n != int64(b.N)*benchChunk {
		b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)*benchChunk)
	}
	b.StopTimer()
	// Process CPU (both ends, relay and sink) per MiB: steadier than wall
	// time on a shared machine.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(writeSyscalls()-w0)/float64(b.N), "writes/op")
	c.Close()
}

// writeSyscalls returns the process's write-class system calls so far
// (syscw in /proc/self/io: write, writev, sendmsg, ...), or 0 when the
// kernel does not account them.
func writeSyscalls() int64 {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "syscw: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// BenchmarkRoundTrip measures 1 KiB request/response round trips on one
// warm stream, client → HBONE server → loopback echo and back: the
// per-request cost of both HBONE ends (frames, records, hand-offs and
// system calls). One op is one round trip.
func BenchmarkRoundTrip(b *testing.B) {
	e := newEnv(b, envOpts{})
	p := e.pool(b, Params{})
	s := dial(b, p, e.request())
	defer s.Close()
	req := make([]byte, 1024)
	resp := make([]byte, 1024)
	b.ReportAllocs()
	cpu0, w0 := cpuTime(), writeSyscalls()
	b.ResetTimer()
	for range b.N {
		if _, err := s.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, resp); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(writeSyscalls()-w0)/float64(b.N), "writes/op")
}

// BenchmarkBulkParallel is BenchmarkBulk with 8 streams to one peer at
// once (they share the pool's connections). One op is 1 MiB on each
// stream.
func BenchmarkBulkParallel(b *testing.B) {
	const streams = 8
	e := newEnv(b, envOpts{})
	sk := startSink(b)
	p := e.pool(b, Params{})
	r := e.request()
	r.Authority = sk.addr
	ss := make([]*Stream, streams)
	for i := range ss {
		ss[i] = dial(b, p, r)
	}
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk * streams)
	b.ReportAllocs()
	cpu0, w0 := cpuTime(), writeSyscalls()
	b.ResetTimer()
	var wg sync.WaitGroup
	for _, s := range ss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range b.N {
				if _, err := s.Write(buf); err != nil {
					b.Error(err)
					return
				}
			}
			s.CloseWrite()
		}()
	}
	wg.Wait()
	for range ss {
		<-sk.done
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(writeSyscalls()-w0)/float64(b.N), "writes/op")
	for _, s := range ss {
		s.Close()
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// pipeHandler answers every CONNECT at once with an in-memory upstream, so
// that stream setup measures HBONE alone.
func pipeHandler() (Handler, func()) {
	var mu sync.Mutex
	var ends []net.Conn
	h := HandlerFunc(func(ctx context.Context, r *ServerRequest) (net.Conn, error) {
		a, b := net.Pipe()
		mu.Lock()
		ends = append(ends, b)
		mu.Unlock()
		return a, nil
	})
	return h, func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range ends {
			c.Close()
		}
		ends = nil
	}
}

// BenchmarkStreamSetup measures Dial (CONNECT sent to 200 received) on a
// warm pool: "memory" with an in-memory upstream, "tcp" with a loopback TCP
// connect by the server. Streams are closed in batches with the timer off.
func BenchmarkStreamSetup(b *testing.B) {
	b.Run("memory", func(b *testing.B) {
		h, closeAll := pipeHandler()
		defer closeAll()
		e := newEnv(b, envOpts{handler: h})
		benchSetup(b, e)
	})
	b.Run("tcp", func(b *testing.B) {
		e := newEnv(b, envOpts{})
		benchSetup(b, e)
	})
}

func benchSetup(b *testing.B, e *env) {
	p := e.pool(b, Params{})
	r := e.request()
	dial(b, p, r).Close()
	ctx := context.Background()
	open := make([]*Stream, 0, 64)
	closeOpen := func() {
		for _, s := range open {
			s.Close()
		}
		open = open[:0]
		// Let the server finish the closed streams so they do not compete.
		time.Sleep(time.Millisecond)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		s, err := p.Dial(ctx, r)
		if err != nil {
			b.Fatal(err)
		}
		open = append(open, s)
		if len(open) == cap(open) {
			b.StopTimer()
			closeOpen()
			b.StartTimer()
		}
	}
	b.StopTimer()
	closeOpen()
}

// BenchmarkIdleStreamMemory opens idle tunnels and reports the Go heap and
// stack they hold, client and server sides together, per stream.
func BenchmarkIdleStreamMemory(b *testing.B) {
	const n = 1000
	h, closeAll := pipeHandler()
	defer closeAll()
	e := newEnv(b, envOpts{handler: h})
	p := e.pool(b, Params{})
	r := e.request()
	dial(b, p, r).Close()
	for range b.N {
		b.StopTimer()
		before := memInUse()
		b.StartTimer()
		streams := make([]*Stream, n)
		for i := range streams {
			s, err := p.Dial(context.Background(), r)
			if err != nil {
				b.Fatal(err)
			}
			streams[i] = s
		}
		b.StopTimer()
		time.Sleep(50 * time.Millisecond) // let server goroutines park
		after := memInUse()
		b.ReportMetric(float64(after-before)/n, "B/idle-stream")
		for _, s := range streams {
			s.Close()
		}
		closeAll()
		b.StartTimer()
	}
}

func memInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}
