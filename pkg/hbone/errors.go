package hbone

import (
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/net/http2"
)

// ErrDenied is returned by a Handler to refuse a request by policy; the client sees 401.
var ErrDenied = errors.New("hbone: denied by policy")

// ErrConnClosed reports that the HTTP/2 connection under a stream has ended.
var ErrConnClosed = errors.New("hbone: connection closed")

// ErrPoolClosed is returned by Pool.Dial after Pool.Close.
var ErrPoolClosed = errors.New("hbone: pool closed")

// StatusError is a non-200 answer to a CONNECT. A Handler may return one to
// choose the status; Pool.Dial returns one when the server refused.
type StatusError struct {
	Code int
	Err  error
}

func (e *StatusError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("hbone: status %d %s: %v", e.Code, http.StatusText(e.Code), e.Err)
	}
	return fmt.Sprintf("hbone: status %d %s", e.Code, http.StatusText(e.Code))
}

func (e *StatusError) Unwrap() error { return e.Err }

// StreamResetError reports a stream ended by RST_STREAM.
type StreamResetError struct {
	Code http2.ErrCode
	// Remote is true when the peer sent the reset.
	Remote bool
}

func (e *StreamResetError) Error() string {
	who := "local"
	if e.Remote {
		who = "peer"
	}
	return fmt.Sprintf("hbone: stream reset by %s: %v", who, e.Code)
}

// connError is a fatal connection error with the GOAWAY code to send.
type connError struct {
	code http2.ErrCode
	msg  string
}

func (e connError) Error() string {
	return fmt.Sprintf("hbone: connection error %v: %s", e.code, e.msg)
}

// retryable reports whether a CONNECT may be retried on another connection
// because the server never processed it.
func retryable(err error) bool {
	var re *StreamResetError
	if errors.As(err, &re) && re.Remote && re.Code == http2.ErrCodeRefusedStream {
		return true
	}
	return errors.Is(err, errGoAwayRefused) || errors.Is(err, errNotSent) || errors.Is(err, errLostBeforeResponse)
}

var (
	errGoAwayRefused = errors.New("hbone: stream not processed before GOAWAY")
	errNotSent       = errors.New("hbone: connection closed before the request was sent")
	// errLostBeforeResponse: the connection died after the CONNECT was sent
	// but before its response; nothing was relayed (retryable).
	errLostBeforeResponse = errors.New("hbone: connection lost before the response")
	errPingTimeout        = errors.New("hbone: ping timeout")
	errIdle               = errors.New("hbone: idle timeout")
)
