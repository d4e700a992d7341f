package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The connection engine: one HTTP/2 connection over an established TLS
// connection, for either role. Invariants:
//
//   - One goroutine reads frames (readLoop) and never writes to the socket:
//     frames it must send (SETTINGS and PING acks, WINDOW_UPDATE, RST_STREAM)
//     go through ctrlQ to writeLoop, so two peers blocked on full send
//     buffers cannot deadlock each other.
//   - writeMu serializes every socket write and owns the HPACK encoder and
//     the per-stream endSent/rstSent flags, so no frame follows a stream's
//     END_STREAM or RST_STREAM and stream IDs reach the wire in order.
//     lockWrite/unlockWrite take it and gather the TLS records written
//     meanwhile into one write(2) (batchConn); a plain writeMu.Lock writes
//     each record on its own, which is correct but slower.
//   - mu guards everything else; a stream's cond uses mu. Lock order:
//     writeMu before mu; Pool.mu before mu; callbacks run with no lock held.
//   - A stream counts toward the concurrency limit from HEADERS until both
//     sides ended it or it was reset; its receive buffer lives until the
//     application has read it or closed the stream.

type role uint8

const (
	clientRole role = iota
	serverRole
)

// HTTP/2 defaults before the peer's SETTINGS arrive (RFC 9113 6.5.2).
const (
	initialWindow = 65535
	initialFrame  = 16384
)

type ctrlFrame struct {
	kind   http2.FrameType
	stream uint32
	val    uint32 // window increment, error code or last stream ID
	s      *Stream
	ping   [8]byte
}

type conn struct {
	role role
	nc   net.Conn
	p    Params
	log  *slog.Logger
	fr   *http2.Framer

	writeMu   sync.Mutex
	batch     *batchConn // under the TLS connection; nil when nc is not TLS over one
	henc      *hpack.Encoder
	hbuf      bytes.Buffer
	hencLimit uint32 // table size limit applied to henc

	mu             sync.Mutex
	streams        map[uint32]*Stream
	nextID         uint32 // client: next stream ID
	maxPeerID      uint32 // server: highest stream ID opened by the client
	active         int    // streams in the map
	reserved       int    // client: slots promised by tryReserve
	handlers       int    // server: stream goroutines still running
	peerMaxStreams uint32
	peerInitWin    int32
	peerMaxFrame   uint32
	peerTableSize  uint32 // SETTINGS_HEADER_TABLE_SIZE: bounds our HPACK encoder
	sendWin        int64
	recvAvail      int64
	recvUnacked    int64
	goAway         bool // GOAWAY received
	goAwayID       uint32
	draining       bool // GOAWAY sent
	err            error
	idleSince      time.Time
	idleTimer      *time.Timer
	ctrlQ          []ctrlFrame
	ctrlFlood      atomic.Bool // set under mu, read without
	sawSettings    bool

	ctrlSig   chan struct{}
	pingAck   chan struct{}
	settingsc chan struct{}
	done      chan struct{}

	// onClose runs once, without locks, after the connection died.
	onClose func(*conn)
	// onRequest runs on its own goroutine for each new server stream.
	onRequest func(s *Stream, fields []hpack.HeaderField, truncated bool)
	// onRefuse counts a refused stream (server).
	onRefuse func(Refusal)
}

func newConn(nc net.Conn, r role, p Params, log *slog.Logger) *conn {
	c := &conn{
		role:           r,
		nc:             nc,
		p:              p,
		log:            log,
		streams:        make(map[uint32]*Stream),
		nextID:         1,
		peerMaxStreams: math.MaxUint32,
		peerInitWin:    initialWindow,
		peerMaxFrame:   initialFrame,
		peerTableSize:  4096,
		hencLimit:      4096,
		sendWin:        initialWindow,
		recvAvail:      int64(p.ConnWindow),
		idleSince:      time.Now(),
		ctrlSig:        make(chan struct{}, 1),
		pingAck:        make(chan struct{}, 1),
		settingsc:      make(chan struct{}),
		done:           make(chan struct{}),
	}
	if tc, ok := nc.(*tls.Conn); ok {
		c.batch, _ = tc.NetConn().(*batchConn)
	}
	c.fr = http2.NewFramer(nc, nc)
	c.fr.SetMaxReadFrameSize(p.MaxFrameSize)
	c.fr.MaxHeaderListSize = p.MaxHeaderListSize
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.idleTimer = time.AfterFunc(p.IdleTimeout, c.onIdle)
	return c
}

// start writes this side's preface and SETTINGS and starts the loops.
func (c *conn) start() error {
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: uint32(c.p.StreamWindow)},
		{ID: http2.SettingMaxFrameSize, Val: c.p.MaxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: c.p.MaxHeaderListSize},
	}
	if c.role == clientRole {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: uint32(c.p.MaxStreamsPerConn)})
	}
	c.lockWrite()
	var err error
	if c.role == clientRole {
		_, err = io.WriteString(c.nc, http2.ClientPreface)
	}
	if err == nil {
		err = c.fr.WriteSettings(settings...)
	}
	if err == nil && c.p.ConnWindow > initialWindow {
		err = c.fr.WriteWindowUpdate(0, uint32(c.p.ConnWindow-initialWindow))
	}
	err = c.unlockWrite(err)
	if err != nil {
		c.fail(fmt.Errorf("write preface: %w", err))
		return err
	}
	go c.readLoop()
	go c.writeLoop()
	return nil
}

// waitSettings waits for the peer's first SETTINGS frame.
func (c *conn) waitSettings(ctx context.Context) error {
	select {
	case <-c.settingsc:
		return nil
	case <-c.done:
		return c.closedErr()
	case <-ctx.Done():
		c.fail(ctx.Err())
		return fmt.Errorf("wait for peer settings: %w", ctx.Err())
	}
}

func (c *conn) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrConnClosed, c.err)
}

// fail closes the connection at once and ends every stream with err.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if err == nil {
		err = io.EOF
	}
	c.err = err
	serr := fmt.Errorf("%w: %w", ErrConnClosed, err)
	for _, s := range c.streams {
		if s.resetErr == nil {
			s.resetErr = serr
		}
		s.removed = true
		if !s.rclosed {
			s.buf.release() // data after END_STREAM stays readable
		}
		s.finishResponseLocked()
		if s.cancel != nil {
			s.cancel()
		}
		s.cond.Broadcast()
	}
	clear(c.streams)
	c.active = 0
	c.idleTimer.Stop()
	close(c.done)
	c.mu.Unlock()
	c.nc.Close()
	if c.onClose != nil {
		c.onClose(c)
	}
}

// goAwayAndClose sends GOAWAY with code, best effort, then closes.
func (c *conn) goAwayAndClose(code http2.ErrCode, err error) {
	c.mu.Lock()
	dead := c.err != nil
	last := c.maxPeerID
	c.mu.Unlock()
	if !dead {
		_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.lockWrite()
		_ = c.unlockWrite(c.fr.WriteGoAway(last, code, nil))
	}
	c.fail(err)
}

// drain sends GOAWAY: streams already open finish, new ones are refused,
// and the connection closes once the last stream ends.
func (c *conn) drain() {
	c.mu.Lock()
	if c.err != nil || c.draining {
		c.mu.Unlock()
		return
	}
	c.draining = true
	last := c.maxPeerID
	idle := c.active == 0 && c.reserved == 0
	c.mu.Unlock()
	c.lockWrite()
	err := c.unlockWrite(c.fr.WriteGoAway(last, http2.ErrCodeNo, nil))
	if err != nil || idle {
		c.fail(errors.New("drained"))
	}
}

func (c *conn) onIdle() {
	c.mu.Lock()
	idle := c.err == nil && c.active == 0 && c.reserved == 0 && time.Since(c.idleSince) >= c.p.IdleTimeout-time.Millisecond
	c.mu.Unlock()
	if idle {
		c.log.Debug("hbone: closing idle connection", "remote", c.nc.RemoteAddr())
		c.goAwayAndClose(http2.ErrCodeNo, errIdle)
	}
}

// becameIdleLocked runs when the last stream or reservation went away.
func (c *conn) becameIdleLocked() {
	if c.err != nil || c.active != 0 || c.reserved != 0 {
		return
	}
	if c.goAway || c.draining {
		go c.fail(errors.New("drained"))
		return
	}
	c.idleSince = time.Now()
	c.idleTimer.Reset(c.p.IdleTimeout)
}

// removeStreamLocked takes a finished stream out of the concurrency count.
func (c *conn) removeStreamLocked(s *Stream) {
	if s.removed {
		return
	}
	s.removed = true
	delete(c.streams, s.id)
	c.active--
	if s.cancel != nil {
		s.cancel()
	}
	// Unread data no longer holds the connection window (nor data handed
	// to a waiting Read that has not returned yet: it credits nothing once
	// the stream is removed).
	c.recvUnacked += int64(s.buf.Len() + s.rdn)
	c.maybeConnUpdateLocked()
	c.becameIdleLocked()
}

// maxCtrlQueue bounds control frames waiting for the writer: a peer that
// floods PINGs or SETTINGS faster than it reads the answers is cut off.
const maxCtrlQueue = 4096

func (c *conn) queueLocked(f ctrlFrame) {
	if len(c.ctrlQ) >= maxCtrlQueue {
		c.ctrlFlood.Store(true)
		return
	}
	c.ctrlQ = append(c.ctrlQ, f)
	select {
	case c.ctrlSig <- struct{}{}:
	default:
	}
}

func (c *conn) maybeConnUpdateLocked() {
	if c.recvUnacked >= int64(c.p.ConnWindow)/4 && c.err == nil {
		c.queueLocked(ctrlFrame{kind: http2.FrameWindowUpdate, val: uint32(c.recvUnacked)})
		c.recvAvail += c.recvUnacked
		c.recvUnacked = 0
	}
}

// writeLoop writes control frames and runs the keep-alive PINGs.
func (c *conn) writeLoop() {
	t := time.NewTimer(c.p.PingInterval)
	defer t.Stop()
	waiting := false
	var q []ctrlFrame
	var ping [8]byte
	var seq uint64
	for {
		select {
		case <-c.done:
			return
		case <-c.ctrlSig:
			c.mu.Lock()
			q = append(q[:0], c.ctrlQ...)
			clear(c.ctrlQ)
			c.ctrlQ = c.ctrlQ[:0]
			c.mu.Unlock()
			if err := c.writeCtrl(q); err != nil {
				c.fail(fmt.Errorf("write control frame: %w", err))
				return
			}
			clear(q)
		case <-c.pingAck:
			if waiting {
				waiting = false
				t.Reset(c.p.PingInterval)
			}
		case <-t.C:
			if waiting {
				c.log.Debug("hbone: ping timeout", "remote", c.nc.RemoteAddr())
				c.fail(errPingTimeout)
				return
			}
			seq++
			for i := range ping {
				ping[i] = byte(seq >> (8 * i))
			}
			c.lockWrite()
			err := c.unlockWrite(c.fr.WritePing(false, ping))
			if err != nil {
				c.fail(fmt.Errorf("write ping: %w", err))
				return
			}
			waiting = true
			t.Reset(c.p.PingTimeout)
		}
	}
}

// lockWrite takes writeMu and opens a batch: the TLS records written until
// unlockWrite leave in one write(2).
func (c *conn) lockWrite() {
	c.writeMu.Lock()
	if c.batch != nil {
		c.batch.begin()
	}
}

// unlockWrite writes the batch and releases writeMu. It returns err, the
// error of the frame writes, or else the socket write's.
func (c *conn) unlockWrite(err error) error {
	if c.batch != nil {
		if ferr := c.batch.flush(); err == nil && ferr != nil {
			err = fmt.Errorf("write batch: %w", ferr)
		}
	}
	c.writeMu.Unlock()
	return err
}

// writeCtrl writes queued control frames in one batch.
func (c *conn) writeCtrl(q []ctrlFrame) error {
	c.lockWrite()
	return c.unlockWrite(c.writeCtrlLocked(q))
}

func (c *conn) writeCtrlLocked(q []ctrlFrame) error {
	for _, f := range q {
		var err error
		switch f.kind {
		case http2.FrameWindowUpdate:
			if f.s != nil && f.s.rstSent {
				continue
			}
			err = c.fr.WriteWindowUpdate(f.stream, f.val)
		case http2.FrameRSTStream:
			if f.s != nil {
				if f.s.rstSent {
					continue
				}
				f.s.rstSent = true
			}
			err = c.fr.WriteRSTStream(f.stream, http2.ErrCode(f.val))
		case http2.FramePing:
			err = c.fr.WritePing(true, f.ping)
		case http2.FrameSettings:
			err = c.fr.WriteSettingsAck()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// startHeaderBlock resets the HPACK buffer and applies the peer's table
// size limit; writeMu held, limit read under mu.
func (c *conn) startHeaderBlock(limit uint32) {
	if limit != c.hencLimit {
		c.henc.SetMaxDynamicTableSizeLimit(limit)
		c.hencLimit = limit
	}
	c.hbuf.Reset()
}

// writeHeaderBlock writes HEADERS (and CONTINUATION) frames; writeMu held.
func (c *conn) writeHeaderBlock(id uint32, endStream bool, block []byte, maxFrame int) error {
	first := true
	for first || len(block) > 0 {
		chunk := block
		if len(chunk) > maxFrame {
			chunk = chunk[:maxFrame]
		}
		block = block[len(chunk):]
		var err error
		if first {
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: chunk, EndStream: endStream, EndHeaders: len(block) == 0})
			first = false
		} else {
			err = c.fr.WriteContinuation(id, len(block) == 0, chunk)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) readLoop() {
	first := true
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.resetFromRead(se.StreamID, se.Code)
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.protocolError(http2.ErrCode(ce), err.Error())
				return
			}
			if errors.Is(err, http2.ErrFrameTooLarge) {
				c.protocolError(http2.ErrCodeFrameSize, err.Error())
				return
			}
			c.fail(fmt.Errorf("read frame: %w", err))
			return
		}
		if first {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				c.protocolError(http2.ErrCodeProtocol, "first frame is not SETTINGS")
				return
			}
			first = false
		}
		var cerr *connError
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			cerr = c.onHeaders(f)
		case *http2.DataFrame:
			cerr = c.onData(f)
		case *http2.WindowUpdateFrame:
			cerr = c.onWindowUpdate(f)
		case *http2.SettingsFrame:
			cerr = c.onSettings(f)
		case *http2.PingFrame:
			c.onPing(f)
		case *http2.RSTStreamFrame:
			c.onReset(f)
		case *http2.GoAwayFrame:
			c.onGoAway(f)
		case *http2.PushPromiseFrame:
			cerr = &connError{http2.ErrCodeProtocol, "PUSH_PROMISE refused"}
		}
		if cerr == nil && c.ctrlFlood.Load() {
			cerr = &connError{http2.ErrCodeEnhanceYourCalm, "control frame flood"}
		}
		if cerr != nil {
			c.protocolError(cerr.code, cerr.msg)
			return
		}
	}
}

func (c *conn) protocolError(code http2.ErrCode, msg string) {
	if c.onRefuse != nil {
		c.onRefuse(RefusedProtocol)
	}
	c.log.Debug("hbone: connection error", "remote", c.nc.RemoteAddr(), "code", code, "msg", msg)
	c.goAwayAndClose(code, connError{code, msg})
}

// resetFromRead resets a stream because of a stream error found while reading.
func (c *conn) resetFromRead(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.streams[id]
	if s != nil {
		c.resetLocked(s, &StreamResetError{Code: code})
	}
	c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: id, val: uint32(code), s: s})
}

// resetLocked ends a stream with err, dropping unread data.
func (c *conn) resetLocked(s *Stream, err error) {
	if s.resetErr == nil {
		s.resetErr = err
	}
	c.recvUnacked += int64(s.buf.release())
	s.finishResponseLocked()
	c.removeStreamLocked(s)
	s.cond.Broadcast()
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) *connError {
	id := f.StreamID
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.streams[id]; s != nil {
		if c.role == clientRole && !s.gotResponse {
			status, err := strconv.Atoi(f.PseudoValue("status"))
			if err != nil || status < 100 || status > 999 {
				c.resetLocked(s, &StreamResetError{Code: http2.ErrCodeProtocol})
				c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: id, val: uint32(http2.ErrCodeProtocol), s: s})
				return nil
			}
			if status < 200 {
				return nil // informational
			}
			s.gotResponse = true
			s.status = status
			s.finishResponseLocked()
		} else if !f.StreamEnded() {
			// Trailers must end the stream.
			c.resetLocked(s, &StreamResetError{Code: http2.ErrCodeProtocol})
			c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: id, val: uint32(http2.ErrCodeProtocol), s: s})
			return nil
		}
		if f.StreamEnded() {
			c.endRecvLocked(s)
		}
		return nil
	}
	if c.role == clientRole {
		if id%2 == 0 || id >= c.nextID {
			return &connError{http2.ErrCodeProtocol, "HEADERS on a stream the client did not open"}
		}
		return nil // a stream we already forgot
	}
	if id%2 == 0 {
		return &connError{http2.ErrCodeProtocol, "even stream ID from client"}
	}
	if id <= c.maxPeerID {
		return &connError{http2.ErrCodeStreamClosed, "HEADERS on a closed stream"}
	}
	c.maxPeerID = id
	if c.draining {
		c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: id, val: uint32(http2.ErrCodeRefusedStream)})
		return nil
	}
	// Handlers still running for streams already reset count too, so a
	// client opening and resetting streams in a loop (CVE-2023-44487,
	// "rapid reset") cannot start unbounded work.
	if c.active >= c.p.MaxStreamsPerConn || c.handlers >= 2*c.p.MaxStreamsPerConn {
		c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: id, val: uint32(http2.ErrCodeRefusedStream)})
		if c.onRefuse != nil {
			c.onRefuse(RefusedStreamLimit)
		}
		return nil
	}
	s := c.newStreamLocked(id)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if f.StreamEnded() {
		s.rclosed = true
	}
	c.addStreamLocked(s)
	c.handlers++
	go func(fields []hpack.HeaderField, truncated bool) {
		defer func() {
			c.mu.Lock()
			c.handlers--
			c.mu.Unlock()
		}()
		c.onRequest(s, fields, truncated)
	}(f.Fields, f.Truncated)
	return nil
}

func (c *conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{
		c:         c,
		id:        id,
		sendWin:   int64(c.peerInitWin),
		recvAvail: int64(c.p.StreamWindow),
	}
	s.cond.L = &c.mu
	return s
}

func (c *conn) addStreamLocked(s *Stream) {
	c.streams[s.id] = s
	c.active++
	c.idleTimer.Stop()
}

// endRecvLocked marks END_STREAM received.
func (c *conn) endRecvLocked(s *Stream) {
	s.rclosed = true
	s.cond.Broadcast()
	if s.wclosed {
		c.removeStreamLocked(s)
	}
}

func (c *conn) onData(f *http2.DataFrame) *connError {
	n := int64(f.Length)
	data := f.Data()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.recvAvail -= n
	if c.recvAvail < 0 {
		return &connError{http2.ErrCodeFlowControl, "connection window exceeded"}
	}
	s := c.streams[f.StreamID]
	if s == nil || s.rclosed {
		// Give the window back.
		c.recvUnacked += n
		c.maybeConnUpdateLocked()
		if s == nil {
			if c.role == serverRole && f.StreamID > c.maxPeerID || c.role == clientRole && f.StreamID >= c.nextID {
				return &connError{http2.ErrCodeProtocol, "DATA on an idle stream"}
			}
			return nil // a stream we reset or finished: frames in flight are ignored
		}
		// DATA after the peer's END_STREAM.
		c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: f.StreamID, val: uint32(http2.ErrCodeStreamClosed), s: s})
		c.resetLocked(s, &StreamResetError{Code: http2.ErrCodeStreamClosed})
		return nil
	}
	if c.role == clientRole && !s.gotResponse {
		c.resetLocked(s, &StreamResetError{Code: http2.ErrCodeProtocol})
		c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: s.id, val: uint32(http2.ErrCodeProtocol), s: s})
		return nil
	}
	s.recvAvail -= n
	if s.recvAvail < 0 {
		c.resetLocked(s, &StreamResetError{Code: http2.ErrCodeFlowControl})
		c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: s.id, val: uint32(http2.ErrCodeFlowControl), s: s})
		return nil
	}
	if pad := n - int64(len(data)); pad > 0 {
		c.recvUnacked += pad
		s.unacked += pad
	}
	if s.appClosed {
		c.recvUnacked += int64(len(data))
		c.maybeConnUpdateLocked()
	} else if len(data) > 0 {
		if s.rdst != nil && s.rdn == 0 && s.buf.Len() == 0 {
			// A Read is waiting: hand it the payload without buffering.
			k := copy(s.rdst, data)
			s.rdn = k
			data = data[k:]
		}
		if len(data) > 0 {
			s.buf.Write(data)
		}
		s.cond.Broadcast()
	}
	if f.StreamEnded() {
		c.endRecvLocked(s)
	}
	return nil
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) *connError {
	c.mu.Lock()
	defer c.mu.Unlock()
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		c.sendWin += inc
		if c.sendWin > math.MaxInt32 {
			return &connError{http2.ErrCodeFlowControl, "connection window overflow"}
		}
		for _, s := range c.streams {
			s.cond.Broadcast()
		}
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return nil
	}
	s.sendWin += inc
	if s.sendWin > math.MaxInt32 {
		c.resetLocked(s, &StreamResetError{Code: http2.ErrCodeFlowControl})
		c.queueLocked(ctrlFrame{kind: http2.FrameRSTStream, stream: s.id, val: uint32(http2.ErrCodeFlowControl), s: s})
		return nil
	}
	s.cond.Broadcast()
	return nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) *connError {
	if f.IsAck() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var cerr *connError
	err := f.ForeachSetting(func(st http2.Setting) error {
		if err := st.Valid(); err != nil {
			return err
		}
		switch st.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(st.Val) - int64(c.peerInitWin)
			c.peerInitWin = int32(st.Val)
			for _, s := range c.streams {
				s.sendWin += delta
				if s.sendWin > math.MaxInt32 {
					cerr = &connError{http2.ErrCodeFlowControl, "stream window overflow"}
				}
				s.cond.Broadcast()
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = st.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = st.Val
		case http2.SettingHeaderTableSize:
			c.peerTableSize = st.Val
		}
		return nil
	})
	if err != nil {
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			return &connError{http2.ErrCode(ce), "invalid setting"}
		}
		return &connError{http2.ErrCodeProtocol, err.Error()}
	}
	if cerr != nil {
		return cerr
	}
	c.queueLocked(ctrlFrame{kind: http2.FrameSettings})
	if !c.sawSettings {
		c.sawSettings = true
		close(c.settingsc)
	}
	return nil
}

func (c *conn) onPing(f *http2.PingFrame) {
	if f.IsAck() {
		select {
		case c.pingAck <- struct{}{}:
		default:
		}
		return
	}
	c.mu.Lock()
	c.queueLocked(ctrlFrame{kind: http2.FramePing, ping: f.Data})
	c.mu.Unlock()
}

func (c *conn) onReset(f *http2.RSTStreamFrame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.streams[f.StreamID]; s != nil {
		c.resetLocked(s, &StreamResetError{Code: f.ErrCode, Remote: true})
	}
}

func (c *conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAway = true
	c.goAwayID = f.LastStreamID
	if f.ErrCode != http2.ErrCodeNo {
		c.log.Debug("hbone: GOAWAY", "remote", c.nc.RemoteAddr(), "code", f.ErrCode, "debug", string(f.DebugData()))
	}
	if c.role == clientRole {
		for id, s := range c.streams {
			if id > f.LastStreamID {
				c.resetLocked(s, errGoAwayRefused)
			}
		}
	}
	c.becameIdleLocked()
	c.mu.Unlock()
}

// tryReserve promises a stream slot to a client dial.
func (c *conn) tryReserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goAway || c.draining || c.nextID > math.MaxInt32 {
		return false
	}
	limit := c.p.MaxStreamsPerConn
	if uint64(c.peerMaxStreams) < uint64(limit) {
		limit = int(c.peerMaxStreams)
	}
	if c.active+c.reserved >= limit {
		return false
	}
	c.reserved++
	c.idleTimer.Stop()
	return true
}

// load reports open streams and reservations, and whether tryReserve
// would succeed now.
func (c *conn) load() (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goAway || c.draining || c.nextID > math.MaxInt32 {
		return 0, false
	}
	limit := c.p.MaxStreamsPerConn
	if uint64(c.peerMaxStreams) < uint64(limit) {
		limit = int(c.peerMaxStreams)
	}
	n := c.active + c.reserved
	return n, n < limit
}

// streamCount reports open streams and reservations.
func (c *conn) streamCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active + c.reserved
}

// mayCarryStreams reports whether the connection could ever take a new
// stream (it may be full right now).
func (c *conn) mayCarryStreams() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil && !c.goAway && !c.draining && c.peerMaxStreams > 0
}
