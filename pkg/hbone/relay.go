package hbone

import (
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
)

// Relay buffer sizes: a connection starts with the smallest buffer and
// moves up when a read fills it, so idle connections stay cheap and bulk
// ones use few large writes (ztunnel's scheme).
var relayPools = [...]struct {
	size int
	pool sync.Pool
}{{size: 1 << 10}, {size: 16 << 10}, {size: 256 << 10}}

func getRelayBuf(class int) *[]byte {
	if b, ok := relayPools[class].pool.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, relayPools[class].size)
	return &b
}

// RelayResult reports what a Relay moved.
type RelayResult struct {
	// AToB and BToA count the bytes copied in each direction.
	AToB, BToA int64
	// Err is the first error that ended the relay abnormally (a reset or a
	// broken connection), nil when both directions ended with EOF.
	Err error
}

// Relay copies a→b and b→a until both directions end, then closes both.
// EOF in one direction is passed on as a half-close (CloseWrite on TCP and
// Stream); an error in either direction aborts both (RST on TCP, RST_STREAM
// on a Stream) so the other direction cannot hang. It returns when both
// copies have finished and leaves no goroutine behind.
func Relay(a, b net.Conn) RelayResult {
	var res RelayResult
	var errBA error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		res.BToA, errBA = copyHalf(a, b)
		if errBA != nil {
			abort(a)
			abort(b)
		}
	}()
	var errAB error
	res.AToB, errAB = copyHalf(b, a)
	if errAB != nil {
		abort(a)
		abort(b)
	}
	wg.Wait()
	res.Err = errors.Join(errAB, errBA)
	a.Close()
	b.Close()
	return res
}

// copyHalf copies src to dst and half-closes dst at EOF.
func copyHalf(dst, src net.Conn) (int64, error) {
	class := 0
	bp := getRelayBuf(class)
	defer func() { relayPools[class].pool.Put(bp) }()
	var n int64
	for {
		buf := *bp
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if werr != nil {
				return n, werr
			}
			if nr == len(buf) && class < len(relayPools)-1 {
				relayPools[class].pool.Put(bp)
				class++
				bp = getRelayBuf(class)
			}
		}
		if rerr == io.EOF {
			return n, closeWrite(dst)
		}
		if rerr != nil {
			if errors.Is(rerr, net.ErrClosed) {
				return n, nil // closed by the other direction's abort
			}
			return n, rerr
		}
	}
}

func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		err := cw.CloseWrite()
		if errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ENOTCONN) {
			return nil
		}
		return err
	}
	return c.Close()
}

// abort ends c abruptly: RST_STREAM for a Stream, RST for TCP.
func abort(c net.Conn) {
	switch c := c.(type) {
	case interface{ Abort() error }:
		_ = c.Abort()
	case *net.TCPConn:
		_ = c.SetLinger(0)
		_ = c.Close()
	default:
		_ = c.Close()
	}
}
