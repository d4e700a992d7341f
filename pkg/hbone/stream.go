package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// Stream is one HBONE tunnel: an HTTP/2 CONNECT stream with net.Conn
// semantics. Close ends both directions (with RST_STREAM if the peer was
// still sending), CloseWrite sends END_STREAM (a TCP FIN's equivalent) and
// Abort resets the stream (a TCP RST's equivalent). Read and Write may be
// called concurrently with each other; deadlines behave as net.Conn's.
type Stream struct {
	c    *conn
	id   uint32
	cond sync.Cond // L is &c.mu

	// Guarded by c.mu.
	buf         dataBuffer
	rdst        []byte // a Read waiting for data: the read loop copies DATA straight into it
	rdn         int    // bytes the read loop put into rdst
	recvAvail   int64  // bytes the peer may still send
	unacked     int64  // bytes read but not yet returned by WINDOW_UPDATE
	rclosed     bool   // END_STREAM received
	sendWin     int64
	wclosed     bool // CloseWrite called
	resetErr    error
	removed     bool // no longer counts toward the concurrency limit
	appClosed   bool // Close or Abort called
	gotResponse bool
	respDone    bool
	respc       chan struct{}
	status      int
	rdl, wdl    deadline

	// Guarded by c.writeMu.
	endSent bool
	rstSent bool

	// Server streams: canceled when the stream ends.
	ctx    context.Context
	cancel context.CancelFunc
}

type deadline struct {
	timer   *time.Timer
	gen     uint64
	expired bool
}

var _ net.Conn = (*Stream)(nil)

func (s *Stream) finishResponseLocked() {
	if s.respc != nil && !s.respDone {
		s.respDone = true
		close(s.respc)
	}
}

// Read reads data sent by the peer; it returns io.EOF after the peer's END_STREAM.
//
// A Read that finds nothing buffered lends p to the read loop, which copies
// the next DATA payload straight into it instead of into the stream's
// buffer: one copy less per byte when the reader keeps up.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if s.buf.Len() > 0 {
			if len(p) == 0 {
				return 0, nil
			}
			n := s.buf.Read(p)
			s.creditLocked(n)
			return n, nil
		}
		switch {
		case s.rclosed:
			return 0, io.EOF
		case s.appClosed:
			return 0, net.ErrClosed
		case s.resetErr != nil:
			return 0, s.resetErr
		case s.rdl.expired:
			return 0, os.ErrDeadlineExceeded
		}
		lent := len(p) > 0 && s.rdst == nil
		if lent {
			s.rdst, s.rdn = p, 0
		}
		s.cond.Wait()
		if lent {
			n := s.rdn
			s.rdst, s.rdn = nil, 0
			if n > 0 {
				s.creditLocked(n)
				return n, nil
			}
		}
	}
}

// creditLocked returns read bytes to the peer's flow-control windows.
func (s *Stream) creditLocked(n int) {
	if s.removed {
		return // its unread bytes went back to the connection window at removal
	}
	c := s.c
	s.unacked += int64(n)
	c.recvUnacked += int64(n)
	if !s.rclosed && s.unacked >= int64(c.p.StreamWindow)/4 {
		c.queueLocked(ctrlFrame{kind: http2.FrameWindowUpdate, stream: s.id, val: uint32(s.unacked), s: s})
		s.recvAvail += s.unacked
		s.unacked = 0
	}
	c.maybeConnUpdateLocked()
}

func (s *Stream) writeErrLocked() error {
	switch {
	case s.appClosed:
		return net.ErrClosed
	case s.wclosed:
		return io.ErrClosedPipe
	case s.resetErr != nil:
		return s.resetErr
	case s.wdl.expired:
		return os.ErrDeadlineExceeded
	}
	return nil
}

// Write sends p as DATA frames, waiting for flow-control window.
func (s *Stream) Write(p []byte) (int, error) {
	c := s.c
	written := 0
	for len(p) > 0 {
		c.mu.Lock()
		for {
			if err := s.writeErrLocked(); err != nil {
				c.mu.Unlock()
				return written, err
			}
			if s.sendWin > 0 && c.sendWin > 0 {
				break
			}
			s.cond.Wait()
		}
		// Take as much window as one batch carries: its frames are
		// sealed under one lock and leave in one write(2).
		frame := min(int64(c.peerMaxFrame), int64(c.p.MaxFrameSize), writeFrameCap)
		n := min(int64(len(p)), s.sendWin, c.sendWin, writeBatchFrames*frame)
		s.sendWin -= n
		c.sendWin -= n
		c.mu.Unlock()

		c.lockWrite()
		var err error
		if s.rstSent || s.endSent {
			err = io.ErrClosedPipe
		} else {
			for q := p[:n]; len(q) > 0 && err == nil; {
				k := min(int64(len(q)), frame)
				err = c.fr.WriteData(s.id, false, q[:k])
				q = q[k:]
			}
		}
		err = c.unlockWrite(err)
		if err != nil {
			if err != io.ErrClosedPipe {
				c.fail(err)
				return written, c.closedErr()
			}
			c.mu.Lock()
			// Nothing was sent: the connection window is still ours.
			c.sendWin += n
			for _, o := range c.streams {
				o.cond.Broadcast()
			}
			err = s.writeErrLocked()
			c.mu.Unlock()
			if err == nil {
				err = io.ErrClosedPipe
			}
			return written, err
		}
		written += int(n)
		p = p[n:]
	}
	return written, nil
}

// CloseWrite sends END_STREAM: the peer reads EOF, this side can still read.
func (s *Stream) CloseWrite() error {
	c := s.c
	c.mu.Lock()
	if s.wclosed || s.resetErr != nil || s.appClosed {
		err := s.resetErr
		c.mu.Unlock()
		return err
	}
	s.wclosed = true
	c.mu.Unlock()

	c.lockWrite()
	var err error
	if !s.rstSent && !s.endSent {
		s.endSent = true
		err = c.fr.WriteData(s.id, true, nil)
	}
	err = c.unlockWrite(err)
	if err != nil {
		c.fail(err)
		return err
	}
	c.mu.Lock()
	if s.rclosed {
		c.removeStreamLocked(s)
	}
	c.mu.Unlock()
	return nil
}

// Abort resets the stream (RST_STREAM CANCEL) and discards unread data.
func (s *Stream) Abort() error {
	s.reset(http2.ErrCodeCancel)
	return nil
}

func (s *Stream) reset(code http2.ErrCode) {
	c := s.c
	c.mu.Lock()
	s.appClosed = true
	s.stopTimersLocked()
	wasOpen := !s.removed
	if s.resetErr == nil {
		s.resetErr = &StreamResetError{Code: code}
	}
	c.resetLocked(s, s.resetErr)
	c.mu.Unlock()
	if wasOpen {
		c.lockWrite()
		var err error
		if !s.rstSent {
			s.rstSent = true
			err = c.fr.WriteRSTStream(s.id, code)
		}
		if err = c.unlockWrite(err); err != nil {
			c.fail(err)
			return
		}
	}
}

// Close ends the stream. After both sides ended it cleanly it only frees
// resources; otherwise it half-closes and, if the peer has not finished
// sending, resets the stream as closing a TCP socket with pending input would.
func (s *Stream) Close() error {
	c := s.c
	c.mu.Lock()
	if s.appClosed {
		c.mu.Unlock()
		return nil
	}
	if s.removed {
		s.appClosed = true
		s.stopTimersLocked()
		s.buf.release()
		s.cond.Broadcast()
		c.mu.Unlock()
		return nil
	}
	rclosed := s.rclosed
	c.mu.Unlock()
	if rclosed {
		err := s.CloseWrite()
		c.mu.Lock()
		s.appClosed = true
		s.stopTimersLocked()
		s.buf.release()
		s.cond.Broadcast()
		c.mu.Unlock()
		return err
	}
	s.reset(http2.ErrCodeCancel)
	return nil
}

func (s *Stream) stopTimersLocked() {
	for _, d := range []*deadline{&s.rdl, &s.wdl} {
		if d.timer != nil {
			d.timer.Stop()
			d.timer = nil
		}
	}
}

// LocalAddr returns the local address of the underlying TCP connection.
func (s *Stream) LocalAddr() net.Addr { return s.c.nc.LocalAddr() }

// RemoteAddr returns the remote address of the underlying TCP connection.
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

// ConnectionState returns the TLS state of the underlying connection
// (negotiated parameters and the peer's certificates).
func (s *Stream) ConnectionState() tls.ConnectionState {
	if tc, ok := s.c.nc.(*tls.Conn); ok {
		return tc.ConnectionState()
	}
	return tls.ConnectionState{}
}

// SetDeadline sets the read and write deadlines.
func (s *Stream) SetDeadline(t time.Time) error {
	s.setDeadline(&s.rdl, t)
	s.setDeadline(&s.wdl, t)
	return nil
}

// SetReadDeadline sets the deadline for Read calls.
func (s *Stream) SetReadDeadline(t time.Time) error { s.setDeadline(&s.rdl, t); return nil }

// SetWriteDeadline sets the deadline for Write calls.
func (s *Stream) SetWriteDeadline(t time.Time) error { s.setDeadline(&s.wdl, t); return nil }

func (s *Stream) setDeadline(d *deadline, t time.Time) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	d.gen++
	d.expired = false
	if t.IsZero() {
		s.cond.Broadcast()
		return
	}
	dur := time.Until(t)
	if dur <= 0 {
		d.expired = true
		s.cond.Broadcast()
		return
	}
	gen := d.gen
	d.timer = time.AfterFunc(dur, func() {
		c.mu.Lock()
		if d.gen == gen {
			d.expired = true
			s.cond.Broadcast()
		}
		c.mu.Unlock()
	})
}

// writeFrameCap is the largest DATA payload this side writes, though the
// peer may allow up to 1 MiB: smaller frames let the receiver forward one
// frame while the next is on the wire (measured: 64 KiB frames beat 1 MiB
// ones on loopback), and 9 bytes of frame header plus this payload fill
// exactly four full TLS records.
const writeFrameCap = 4*16384 - 9

// writeBatchFrames is how many full DATA frames one Write seals under one
// lock and sends in one write(2) (batchConn): 256 KiB, a quarter of the
// default stream window, so the peer's WINDOW_UPDATEs keep up.
const writeBatchFrames = 4
