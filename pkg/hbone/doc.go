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
