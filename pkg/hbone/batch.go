package hbone

import (
	"net"
	"sync"
)

// batchBufSize is the gather buffer's capacity: two full 64 KiB DATA
// frames with their TLS record overhead. A batch larger than that leaves
// in several writes of at most this size.
const batchBufSize = 2 * (64<<10 + 4*(5+16+1))

// batchBufPool lends gather buffers for the length of a batch, so an idle
// connection holds none.
var batchBufPool = sync.Pool{New: func() any { b := make([]byte, 0, batchBufSize); return &b }}

// batchConn sits between crypto/tls and the TCP socket and gathers the TLS
// records of one batch of frames into as few write(2) calls as fit its
// buffer. crypto/tls writes each record (at most 16 KiB of plaintext) with
// its own Write call on the socket, so a 64 KiB DATA frame cost four system
// calls, and a frame burst one per frame. Between begin and flush, Writes
// are appended to a pooled buffer (written out when full); outside a batch
// they go straight to the socket (the handshake, alerts, and records
// crypto/tls writes on its own, such as a KeyUpdate answer from the reading
// goroutine). mu orders both kinds, so records reach the wire in the order
// crypto/tls sealed them.
type batchConn struct {
	net.Conn

	mu       sync.Mutex
	batching bool
	buf      *[]byte // lent by batchBufPool while a batch has data
	err      error   // a socket write of this batch failed
}

// Write appends p to the open batch, or writes it to the socket.
func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.batching {
		return b.Conn.Write(p)
	}
	if b.err != nil {
		return 0, b.err
	}
	if b.buf == nil {
		b.buf = batchBufPool.Get().(*[]byte)
	}
	if len(*b.buf)+len(p) > cap(*b.buf) && len(*b.buf) > 0 {
		if b.err = b.writeOutLocked(); b.err != nil {
			return 0, b.err
		}
	}
	if len(p) > cap(*b.buf) {
		return b.Conn.Write(p)
	}
	*b.buf = append(*b.buf, p...)
	return len(p), nil
}

func (b *batchConn) writeOutLocked() error {
	_, err := b.Conn.Write(*b.buf)
	*b.buf = (*b.buf)[:0]
	return err
}

// begin opens a batch; the caller holds the HBONE connection's writeMu, so
// batches never nest.
func (b *batchConn) begin() {
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

// flush closes the batch, writes what it gathered and returns the buffer
// to the pool. It reports the first socket error of the batch.
func (b *batchConn) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	err := b.err
	b.err = nil
	if b.buf != nil {
		if err == nil && len(*b.buf) > 0 {
			err = b.writeOutLocked()
		}
		*b.buf = (*b.buf)[:0]
		batchBufPool.Put(b.buf)
		b.buf = nil
	}
	return err
}
