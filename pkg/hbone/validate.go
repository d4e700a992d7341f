package hbone

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2/hpack"
)

// ConnectRequest is a validated HBONE CONNECT request.
type ConnectRequest struct {
	// Authority is the destination workload address from :authority.
	Authority netip.AddrPort
	// Headers are the regular header fields, canonicalized.
	Headers http.Header
}

// ValidateConnect checks a decoded request header list (pseudo-headers
// first, as HPACK delivers them) as an HBONE CONNECT. It returns a
// *StatusError with 400 for a malformed request (missing or repeated
// :authority, :path, :scheme or :protocol present, an authority that is not
// ip:port, connection-specific or invalid fields) or 405 for a method other
// than CONNECT. It is a pure function.
func ValidateConnect(fields []hpack.HeaderField) (ConnectRequest, error) {
	var method, authority string
	var sawMethod, sawAuthority, sawRegular bool
	h := make(http.Header)
	for _, f := range fields {
		if strings.HasPrefix(f.Name, ":") {
			if sawRegular {
				return ConnectRequest{}, badRequest("pseudo-header %s after regular fields", f.Name)
			}
			switch f.Name {
			case ":method":
				if sawMethod {
					return ConnectRequest{}, badRequest("repeated :method")
				}
				sawMethod, method = true, f.Value
			case ":authority":
				if sawAuthority {
					return ConnectRequest{}, badRequest("repeated :authority")
				}
				sawAuthority, authority = true, f.Value
			case ":path", ":scheme", ":protocol":
				return ConnectRequest{}, badRequest("CONNECT with %s", f.Name)
			default:
				return ConnectRequest{}, badRequest("unknown pseudo-header %q", f.Name)
			}
			continue
		}
		sawRegular = true
		if !httpguts.ValidHeaderFieldName(f.Name) || strings.ToLower(f.Name) != f.Name {
			return ConnectRequest{}, badRequest("invalid header field name %q", f.Name)
		}
		if !httpguts.ValidHeaderFieldValue(f.Value) {
			return ConnectRequest{}, badRequest("invalid value for header %s", f.Name)
		}
		switch f.Name {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host":
			return ConnectRequest{}, badRequest("connection-specific header %s", f.Name)
		case "te":
			if f.Value != "trailers" {
				return ConnectRequest{}, badRequest("te: %q", f.Value)
			}
		}
		h.Add(f.Name, f.Value) // Add canonicalizes the name
	}
	if !sawMethod {
		return ConnectRequest{}, badRequest("missing :method")
	}
	if method != http.MethodConnect {
		return ConnectRequest{}, &StatusError{Code: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %q", method)}
	}
	if !sawAuthority {
		return ConnectRequest{}, badRequest("missing :authority")
	}
	ap, err := ParseAuthority(authority)
	if err != nil {
		return ConnectRequest{}, &StatusError{Code: http.StatusBadRequest, Err: err}
	}
	return ConnectRequest{Authority: ap, Headers: h}, nil
}

// ParseAuthority parses an HBONE :authority: an IP address (IPv6 in
// brackets, no zone) and a non-zero port. IPv4-mapped IPv6 addresses are
// unmapped.
func ParseAuthority(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("authority %q: %w", s, err)
	}
	a := ap.Addr()
	if a.Zone() != "" || a.IsUnspecified() || ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("authority %q: %w", s, errBadAuthority)
	}
	return netip.AddrPortFrom(a.Unmap(), ap.Port()), nil
}

var errBadAuthority = errors.New("want ip:port with a specific address and a non-zero port")

func badRequest(format string, args ...any) error {
	return &StatusError{Code: http.StatusBadRequest, Err: fmt.Errorf(format, args...)}
}
