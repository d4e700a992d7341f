package fdstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ProtocolVersion is the version a holder announces in its hello reply.
const ProtocolVersion = 1

// Limits of the protocol. A frame longer than its side's limit closes the
// connection after an error reply; everything else that breaks a limit gets
// an error reply on a connection that stays usable.
const (
	// MaxKeyLen is the longest key, in bytes.
	MaxKeyLen = 1024
	// MaxRequestSize bounds a request frame's JSON body (the holder's limit).
	MaxRequestSize = 64 << 10
	// MaxReplySize bounds a reply frame's JSON body (the client's limit).
	MaxReplySize = 1 << 20
	// MaxFDsPerFrame is the most fds a reply frame carries; longer answers
	// are split into frames with "more": true. It is below the kernel's
	// SCM_MAX_FD (253), the most one sendmsg may pass.
	MaxFDsPerFrame = 128

	scmMaxFD       = 253       // kernel limit per sendmsg (include/net/scm.h)
	listChunkBytes = 256 << 10 // key bytes per list reply frame
	readChunk      = 64 << 10
)

// Operations of the protocol.
const (
	opHello        = "hello"
	opPut          = "put"
	opGet          = "get"
	opGetPrefix    = "get_prefix"
	opDelete       = "delete"
	opDeletePrefix = "delete_prefix"
	opList         = "list"
	opTakeover     = "takeover"
	opSuperseded   = "superseded"
)

// request is a client's message.
type request struct {
	Op     string      `json:"op"`
	Key    string      `json:"key,omitempty"`
	Prefix string      `json:"prefix,omitempty"`
	FDs    int         `json:"fds,omitempty"`    // fds carried with this frame (SCM_RIGHTS)
	Holder *HolderInfo `json:"holder,omitempty"` // takeover, superseded: the new holder
}

// reply is the holder's answer, one or more frames per request.
type reply struct {
	OK     bool        `json:"ok"`
	Code   string      `json:"code,omitempty"`
	Error  string      `json:"error,omitempty"`
	Holder *HolderInfo `json:"holder,omitempty"` // hello; superseded and takeover errors: the new holder
	Keys   []string    `json:"keys,omitempty"`   // list; get, get_prefix: the key of each fd, in order
	FDs    int         `json:"fds,omitempty"`    // fds carried with this frame
	Count  int         `json:"count,omitempty"`  // delete, delete_prefix: entries removed
	More   bool        `json:"more,omitempty"`   // another frame of this reply follows
}

// HolderInfo describes a holder process, as its hello reply tells it.
type HolderInfo struct {
	// ID is random per holder process: a change means a new holder, whose
	// store may lack what was put to the old one.
	ID      string    `json:"id"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	// Path is the socket path the holder was started on.
	Path    string `json:"path"`
	Version int    `json:"version"`
	// Entries is the number of fds held when the reply was sent.
	Entries int `json:"entries"`
	// SupersededBy is the holder that took this one's place, if any.
	SupersededBy *HolderInfo `json:"superseded_by,omitempty"`
	// TakeoverBy is the holder copying this one's entries right now, if any.
	TakeoverBy *HolderInfo `json:"takeover_by,omitempty"`
}

// String names the holder for logs and errors.
func (h *HolderInfo) String() string {
	if h == nil {
		return "unknown holder"
	}
	return fmt.Sprintf("holder %s (pid %d, %s)", h.ID, h.PID, h.Path)
}

// Error codes of replies.
const (
	codeBadRequest = "bad_request"
	codeTooLarge   = "too_large"
	codeNotFound   = "not_found"
	codeFull       = "full"
	codeForbidden  = "forbidden"
	codeBusy       = "busy"
	codeSuperseded = "superseded"
	codeTakeover   = "takeover"
	codeClosing    = "closing"
)

// Sentinel errors a holder's error reply matches with errors.Is.
var (
	// ErrNotFound: no fd is held under the key.
	ErrNotFound = errors.New("not found")
	// ErrFull: the holder keeps its maximum number of fds.
	ErrFull = errors.New("holder full")
	// ErrBadRequest: the holder could not take the request.
	ErrBadRequest = errors.New("bad request")
	// ErrTooLarge: a frame exceeded the size limit.
	ErrTooLarge = errors.New("message too large")
	// ErrForbidden: the peer's UID differs from the holder's.
	ErrForbidden = errors.New("forbidden")
	// ErrBusy: the holder has its maximum number of connections.
	ErrBusy = errors.New("holder busy")
	// ErrSuperseded: a newer holder took this one's place; talk to the path
	// again. A Client does so by itself.
	ErrSuperseded = errors.New("holder superseded")
	// ErrTakeover: a newer holder is copying this one's entries, which
	// therefore must not change; retry shortly. A Client does so by itself.
	ErrTakeover = errors.New("holder take-over in progress")
	// ErrClosing: the holder is stopping.
	ErrClosing = errors.New("holder closing")
)

var codeErrs = map[string]error{
	codeBadRequest: ErrBadRequest,
	codeTooLarge:   ErrTooLarge,
	codeNotFound:   ErrNotFound,
	codeFull:       ErrFull,
	codeForbidden:  ErrForbidden,
	codeBusy:       ErrBusy,
	codeSuperseded: ErrSuperseded,
	codeTakeover:   ErrTakeover,
	codeClosing:    ErrClosing,
}

// Error is a holder's error reply.
type Error struct {
	Code    string
	Message string
	// Holder is the newer holder for ErrSuperseded and ErrTakeover.
	Holder *HolderInfo
}

// Error returns the holder's message.
func (e *Error) Error() string { return e.Message }

// Is matches the sentinel of the reply's code (ErrNotFound, ErrSuperseded, ...).
func (e *Error) Is(target error) bool {
	s, ok := codeErrs[e.Code]
	return ok && s == target
}

func (r *reply) err() error {
	msg := r.Error
	if msg == "" {
		msg = "error " + r.Code
	}
	return &Error{Code: r.Code, Message: msg, Holder: r.Holder}
}

// frame is one received message: its JSON body and the fds attributed to it.
type frame struct {
	body      []byte
	fds       []int
	truncated bool // the kernel cut the fds short (MSG_CTRUNC)
}

// fdBatch is the fds one recvmsg returned; end is the stream offset just
// past the last byte that recvmsg read.
type fdBatch struct {
	end       int64
	fds       []int
	truncated bool
}

// frameTooLargeError is a length prefix above the reader's limit. The
// stream cannot be resynchronised after it.
type frameTooLargeError struct{ n, limit uint32 }

func (e *frameTooLargeError) Error() string {
	return fmt.Sprintf("message of %d bytes exceeds the limit of %d", e.n, e.limit)
}

// frameConn reads and writes frames on a unix stream socket: a 4-byte
// big-endian length, then that many bytes of JSON, the fds of the frame
// passed with SCM_RIGHTS in the same sendmsg as its first bytes.
//
// The kernel ends a recvmsg right after the first skb that carries fds, so
// the last byte a recvmsg returning fds read belongs to the frame those fds
// were sent with; readFrame attributes them that way, which keeps frames and
// fds in step even when one read spans several frames.
type frameConn struct {
	c        *net.UnixConn
	maxFrame uint32

	buf     []byte // received, not yet returned
	off     int64  // stream offset of buf[0]
	pending []fdBatch
	rbuf    []byte
	oob     []byte
}

func newFrameConn(c *net.UnixConn, maxFrame int) *frameConn {
	return &frameConn{
		c:        c,
		maxFrame: uint32(maxFrame),
		rbuf:     make([]byte, readChunk),
		oob:      make([]byte, unix.CmsgSpace(scmMaxFD*4)),
	}
}

// readFrame returns the next frame. The caller owns the frame's fds.
func (fc *frameConn) readFrame() (frame, error) {
	for {
		if len(fc.buf) >= 4 {
			n := binary.BigEndian.Uint32(fc.buf)
			if n > fc.maxFrame {
				return frame{}, &frameTooLargeError{n: n, limit: fc.maxFrame}
			}
			total := 4 + int(n)
			if len(fc.buf) >= total {
				f := frame{body: append([]byte(nil), fc.buf[4:total]...)}
				end := fc.off + int64(total)
				i := 0
				for ; i < len(fc.pending) && fc.pending[i].end <= end; i++ {
					f.fds = append(f.fds, fc.pending[i].fds...)
					f.truncated = f.truncated || fc.pending[i].truncated
				}
				fc.pending = fc.pending[i:]
				fc.buf = append(fc.buf[:0], fc.buf[total:]...)
				fc.off = end
				return f, nil
			}
		}
		n, oobn, flags, _, err := fc.c.ReadMsgUnix(fc.rbuf, fc.oob)
		n, oobn = max(n, 0), max(oobn, 0) // -1 on some errors
		fc.buf = append(fc.buf, fc.rbuf[:n]...)
		if oobn > 0 || flags&unix.MSG_CTRUNC != 0 {
			b := fdBatch{end: fc.off + int64(len(fc.buf)), truncated: flags&unix.MSG_CTRUNC != 0}
			b.fds, b.truncated = parseRights(fc.oob[:oobn], b.truncated)
			fc.pending = append(fc.pending, b)
			if fc.pendingFDs() > maxPendingFDs {
				// Frames carry fds once each: this is one frame sent in
				// many pieces, each with fds. Bound what it may pin.
				return frame{}, errTooManyFDs
			}
		}
		if err != nil {
			return frame{}, err
		}
		if n == 0 && oobn == 0 {
			return frame{}, errEOF
		}
	}
}

var (
	errEOF        = errors.New("connection closed by peer")
	errTooManyFDs = fmt.Errorf("more than %d fds received for unfinished messages", maxPendingFDs)
)

// maxPendingFDs bounds the fds a connection holds for frames not yet
// complete: the frame being read and the next one.
const maxPendingFDs = 2 * scmMaxFD

func (fc *frameConn) pendingFDs() int {
	n := 0
	for _, b := range fc.pending {
		n += len(b.fds)
	}
	return n
}

// parseRights returns the fds in control messages; anything it cannot parse
// marks the batch truncated (its fds are lost, never leaked: those it found
// are returned).
func parseRights(oob []byte, truncated bool) ([]int, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, true
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			truncated = true
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			truncated = true
			continue
		}
		fds = append(fds, got...)
	}
	return fds, truncated
}

// close closes the connection and every fd received but not returned.
func (fc *frameConn) close() error {
	for _, b := range fc.pending {
		closeFDs(b.fds)
	}
	fc.pending = nil
	return fc.c.Close()
}

// writeFrame sends v as one frame with fds. The fds must stay open until it
// returns.
func (fc *frameConn) writeFrame(v any, fds []int) error {
	// No HTML escaping: a key's JSON is at most twice its length ('"' and
	// '\\'; validKey refuses control characters), which the chunking of
	// replies counts on.
	var b bytes.Buffer
	b.Write([]byte{0, 0, 0, 0})
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	msg := b.Bytes()
	binary.BigEndian.PutUint32(msg, uint32(len(msg)-4))
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := fc.c.WriteMsgUnix(msg, oob, nil)
	// A stream socket may take part of it; the fds went with the first part.
	for err == nil && n < len(msg) {
		var m int
		m, err = fc.c.Write(msg[n:])
		n += m
	}
	return err
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// longAgo is a deadline in the past: it interrupts blocked I/O.
var longAgo = time.Unix(1, 0)

// rawConn is one client connection: request, then reply frames.
type rawConn struct {
	fc *frameConn
}

func dialRaw(ctx context.Context, path string) (*rawConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	return &rawConn{fc: newFrameConn(c.(*net.UnixConn), MaxReplySize)}, nil
}

func (rc *rawConn) close() error { return rc.fc.close() }

// roundTrip sends req with fds and hands each reply frame to each, which
// owns the frame's fds. An error reply is returned as *Error with the
// connection still in step; any other error leaves it unusable.
func (rc *rawConn) roundTrip(ctx context.Context, req *request, fds []int, each func(*reply, []int) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, _ := ctx.Deadline()
	if err := rc.fc.c.SetDeadline(dl); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { rc.fc.c.SetDeadline(longAgo) })
	defer stop()
	ioErr := func(err error) error {
		if cerr := ctx.Err(); cerr != nil {
			return cerr
		}
		if !dl.IsZero() && errors.Is(err, os.ErrDeadlineExceeded) {
			// The connection's deadline fired before the context's timer.
			return context.DeadlineExceeded
		}
		return err
	}
	req.FDs = len(fds)
	if err := rc.fc.writeFrame(req, fds); err != nil {
		// A holder that refuses a connection (another UID, too many
		// connections) answers before reading and closes: its reason may
		// be waiting to be read.
		if f, rerr := rc.fc.readFrame(); rerr == nil {
			closeFDs(f.fds)
			var rep reply
			if json.Unmarshal(f.body, &rep) == nil && !rep.OK && rep.Code != "" {
				return rep.err()
			}
		}
		return ioErr(err)
	}
	for {
		f, err := rc.fc.readFrame()
		if err != nil {
			return ioErr(err)
		}
		var rep reply
		if err := json.Unmarshal(f.body, &rep); err != nil {
			closeFDs(f.fds)
			return fmt.Errorf("protocol error: reply: %w", err)
		}
		if f.truncated || len(f.fds) != rep.FDs {
			closeFDs(f.fds)
			return fmt.Errorf("protocol error: reply claims %d fds, carried %d (truncated %v)", rep.FDs, len(f.fds), f.truncated)
		}
		if !rep.OK {
			closeFDs(f.fds)
			if rep.More {
				return fmt.Errorf("protocol error: error reply with more frames")
			}
			return rep.err()
		}
		if err := each(&rep, f.fds); err != nil {
			return err
		}
		if !rep.More {
			return nil
		}
	}
}

// hello asks the holder who it is.
func (rc *rawConn) hello(ctx context.Context) (*HolderInfo, error) {
	var info *HolderInfo
	err := rc.roundTrip(ctx, &request{Op: opHello}, nil, func(r *reply, fds []int) error {
		closeFDs(fds)
		if r.Holder == nil {
			return fmt.Errorf("protocol error: hello reply without holder")
		}
		info = r.Holder
		return nil
	})
	return info, err
}
