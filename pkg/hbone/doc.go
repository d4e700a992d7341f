// Package hbone carries TCP connections as HTTP/2 CONNECT streams inside
// mutual TLS (HBONE), the tunnel protocol of Istio's ztunnel and waypoints.
//
// # Wire protocol
//
// TCP, then TLS 1.3 with AES-GCM only and ALPN "h2", both sides presenting an
// X.509-SVID (ECDSA P-256) with a SPIFFE URI SAN. One HTTP/2 CONNECT stream
// per application connection: pseudo-headers :method CONNECT and
// :authority ip:port only, plus forwarded, baggage and traceparent headers.
// The server answers 200 once it has connected upstream, 400 for a malformed
// request, 401 when denied, 503 when the upstream is unreachable. END_STREAM
// is a half-close (CloseWrite); RST_STREAM ends both directions (Abort).
//
// # Parameters
//
// Params holds the HTTP/2 and timing knobs, defaulting to ztunnel's values:
// 100 streams per connection, 4 MiB stream and 16 MiB connection windows,
// 1 MiB frames, PING every 10 s and close after 20 s without an answer,
// idle connections closed after 5 minutes.
//
// # API
//
// Client: NewPool(PoolConfig) returns a Pool; Pool.Dial(ctx, Request)
// returns a *Stream (a net.Conn with CloseWrite and Abort) or a
// *StatusError carrying the server's non-200 answer. PoolConfig.TLS is a
// ClientTLS (SPIFFEClientTLS adapts go-spiffe sources; certificates are
// fetched per handshake, so rotation needs no restart), DialContext opens
// the TCP connection (DialRequest(ctx) tells it which Request caused the
// dial, e.g. to enter the source pod's network namespace and set SO_MARK),
// and Metrics is optional. Pool.Stats returns counters.
//
// Server: NewServer(ServerConfig) with a TLS config (ServerTLSConfig builds
// one from go-spiffe sources) and a Handler, whose ServeHBONE(ctx,
// *ServerRequest) returns the upstream connection or an error (ErrDenied:
// 401, *StatusError: its code, other: 503). Serve(listener) or
// ServeConn(conn); GoAway drains connections, Shutdown and Close stop.
// Server.Stats counts connections, streams and refusals by Refusal reason;
// ServerMetrics receives refusals as they happen.
//
// ValidateConnect, the server's request check, is a pure function (fuzzed
// by FuzzValidateConnect). Relay copies between two connections with
// half-close and abort propagation, for both sides of the tunnel.
//
// # Implementation
//
// The TLS layer is crypto/tls with go-spiffe's tlsconfig for peer
// verification. The HTTP/2 layer is golang.org/x/net/http2's Framer and hpack
// (all frame and header parsing), driven by a small connection engine in this
// package (conn.go) shared by client and server. The engine exists because
// x/net's Transport and Server cannot express what HBONE needs: the Server
// resets a CONNECT carrying :path or :scheme before a handler sees it (HBONE
// answers 400), the Transport keys its pool by authority only (HBONE keys by
// identities and addresses) and its request bodies have no half-close with
// deadlines, and neither exposes a per-connection stream cap, a 16 MiB
// connection window on the client and PING-based liveness together.
package hbone
