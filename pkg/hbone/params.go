package hbone

import "time"

// Default protocol parameters (ztunnel's).
const (
	DefaultMaxStreamsPerConn = 100
	DefaultStreamWindow      = 4 << 20
	DefaultConnWindow        = 16 << 20
	DefaultMaxFrameSize      = 1 << 20
	DefaultMaxHeaderListSize = 16 << 10
	DefaultIdleTimeout       = 5 * time.Minute
	DefaultPingInterval      = 10 * time.Second
	DefaultPingTimeout       = 20 * time.Second
	DefaultHandshakeTimeout  = 10 * time.Second
)

// Params are the HTTP/2 and timing parameters of HBONE connections. A zero
// field takes its default; tests shrink the durations.
type Params struct {
	// MaxStreamsPerConn caps concurrent streams on one connection: the
	// client opens a new connection beyond it, the server refuses streams
	// beyond it (and advertises it as SETTINGS_MAX_CONCURRENT_STREAMS).
	MaxStreamsPerConn int
	// StreamWindow is the receive flow-control window of each stream.
	StreamWindow int32
	// ConnWindow is the receive flow-control window of each connection.
	ConnWindow int32
	// MaxFrameSize is the largest frame read and written.
	MaxFrameSize uint32
	// MaxHeaderListSize bounds a received header list (HPACK-decoded
	// size as RFC 9113 counts it); larger requests are answered 431.
	MaxHeaderListSize uint32
	// IdleTimeout closes a connection that has carried no stream for this long.
	IdleTimeout time.Duration
	// PingInterval is the pause between keep-alive PINGs.
	PingInterval time.Duration
	// PingTimeout closes a connection whose PING is unanswered for this long.
	PingTimeout time.Duration
	// HandshakeTimeout bounds the TCP dial, TLS handshake and HTTP/2 preface.
	HandshakeTimeout time.Duration
}

func (p Params) withDefaults() Params {
	if p.MaxStreamsPerConn <= 0 {
		p.MaxStreamsPerConn = DefaultMaxStreamsPerConn
	}
	if p.StreamWindow <= 0 {
		p.StreamWindow = DefaultStreamWindow
	}
	if p.ConnWindow < 65535 {
		p.ConnWindow = DefaultConnWindow
	}
	if p.MaxFrameSize < 16384 || p.MaxFrameSize > 1<<24-1 {
		p.MaxFrameSize = DefaultMaxFrameSize
	}
	if p.MaxHeaderListSize == 0 {
		p.MaxHeaderListSize = DefaultMaxHeaderListSize
	}
	if p.IdleTimeout <= 0 {
		p.IdleTimeout = DefaultIdleTimeout
	}
	if p.PingInterval <= 0 {
		p.PingInterval = DefaultPingInterval
	}
	if p.PingTimeout <= 0 {
		p.PingTimeout = DefaultPingTimeout
	}
	if p.HandshakeTimeout <= 0 {
		p.HandshakeTimeout = DefaultHandshakeTimeout
	}
	return p
}
