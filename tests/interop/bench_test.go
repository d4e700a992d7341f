package interop

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/hbone"
)

const benchChunk = 1 << 20

// BenchmarkBulk measures single-stream upload throughput over loopback,
// client → HBONE server → upstream sink, for warren's client and server
// and for Istio's Go pkg/hbone client and server, same certificates.
// One op is 1 MiB.
func BenchmarkBulk(b *testing.B) {
	b.Run("warren", func(b *testing.B) {
		p := newPKI(b)
		sink, done := startSink(b)
		_, addr := startWarrenServer(b, p)
		pool := warrenPool(b, p)
		s, err := pool.Dial(context.Background(), hbone.Request{
			Source: p.client.ID, Expected: []spiffeid.ID{p.server.ID}, Addr: mustAddrPort(addr), Authority: sink,
		})
		if err != nil {
			b.Fatal(err)
		}
		upload(b, s, done)
	})
	b.Run("istio", func(b *testing.B) {
		p := newPKI(b)
		sink, done := startSink(b)
		addr := startIstioServer(b, p)
		c, err := istioDialer(p, addr).Dial("tcp", sink.String())
		if err != nil {
			b.Fatal(err)
		}
		upload(b, c, done)
	})
}

func upload(b *testing.B, c net.Conn, done <-chan int64) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		c.Close() // Istio's client: a net.Pipe, closing sends END_STREAM
	}
	if n := <-done; n != int64(b.N)*benchChunk {
		b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)*benchChunk)
	}
	b.StopTimer()
	// Process CPU (both ends, relay and sink) per MiB: steadier than wall
	// time on a shared machine.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	c.Close()
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
