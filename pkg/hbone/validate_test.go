package hbone

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/http2/hpack"
)

// fieldsOf decodes the fuzz encoding: fields separated by "\n", name and
// value by the first "=".
func fieldsOf(s string) []hpack.HeaderField {
	var fs []hpack.HeaderField
	for _, line := range strings.Split(s, "\n") {
		if line == "" {
			continue
		}
		name, value, _ := strings.Cut(line, "=")
		fs = append(fs, hpack.HeaderField{Name: name, Value: value})
	}
	return fs
}

func TestValidateConnect(t *testing.T) {
	tests := []struct {
		in   string
		want int // 0: valid
		auth string
	}{
		{":method=CONNECT\n:authority=10.0.0.1:8080\nforwarded=for=\"1.2.3.4:5\"", 0, "10.0.0.1:8080"},
		{":method=CONNECT\n:authority=[2001:2::1]:80\nbaggage=a=b\ntraceparent=00-x", 0, "[2001:2::1]:80"},
		{":method=CONNECT\n:authority=[::ffff:10.0.0.1]:80", 0, "10.0.0.1:80"},
		{":method=CONNECT\n:authority=10.0.0.1:80\nte=trailers", 0, "10.0.0.1:80"},
		{":authority=10.0.0.1:80\n:method=CONNECT", 0, "10.0.0.1:80"},
		{":method=CONNECT\n:authority=10.0.0.1:80\n:path=/", 400, ""},
		{":method=CONNECT\n:scheme=https\n:authority=10.0.0.1:80", 400, ""},
		{":method=CONNECT", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\n:authority=10.0.0.2:80", 400, ""},
		{":method=CONNECT\n:method=CONNECT\n:authority=10.0.0.1:80", 400, ""},
		{":authority=10.0.0.1:80", 400, ""},
		{":method=CONNECT\n:authority=example.com:80", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:99999", 400, ""},
		{":method=CONNECT\n:authority=010.0.0.1:80", 400, ""},
		{":method=CONNECT\n:authority=[fe80::1%eth0]:80", 400, ""},
		{":method=CONNECT\n:authority=[::]:80", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\nx=1\n:status=200", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\nX-Upper=1", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\nbad=a\x00b", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\ntransfer-encoding=chunked", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\nte=gzip", 400, ""},
		{":method=CONNECT\n:authority=10.0.0.1:80\n:foo=bar", 400, ""},
		{":method=GET\n:authority=10.0.0.1:80", 405, ""},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.in, "\n", " "), func(t *testing.T) {
			cr, err := ValidateConnect(fieldsOf(tt.in))
			if tt.want == 0 {
				if err != nil {
					t.Fatalf("unexpected error %v", err)
				}
				if cr.Authority.String() != tt.auth {
					t.Fatalf("authority %s, want %s", cr.Authority, tt.auth)
				}
				return
			}
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tt.want {
				t.Fatalf("error %v, want status %d", err, tt.want)
			}
		})
	}
}

// FuzzValidateConnect checks that validation never panics, answers only
// 400 or 405, and accepts only well-formed CONNECTs with a usable authority.
func FuzzValidateConnect(f *testing.F) {
	for _, s := range []string{
		":method=CONNECT\n:authority=10.0.0.1:8080\nforwarded=for=\"198.18.0.1:1\"",
		":method=CONNECT\n:authority=[2001:2::1]:15008\nbaggage=k=v",
		":method=CONNECT\n:scheme=https\n:path=/\n:authority=10.0.0.1:80",
		":method=GET\n:authority=10.0.0.1:80",
		":authority=[::ffff:1.2.3.4]:1\n:method=CONNECT\nte=trailers",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		fields := fieldsOf(in)
		cr, err := ValidateConnect(fields)
		if err != nil {
			var se *StatusError
			if !errors.As(err, &se) || (se.Code != 400 && se.Code != 405) {
				t.Fatalf("error %v is not a 400/405 StatusError", err)
			}
			return
		}
		var methods, authorities, regular int
		for _, f := range fields {
			switch f.Name {
			case ":method":
				methods++
				if f.Value != "CONNECT" {
					t.Fatalf("accepted method %q", f.Value)
				}
			case ":authority":
				authorities++
			case ":path", ":scheme", ":protocol":
				t.Fatalf("accepted %s", f.Name)
			default:
				if strings.HasPrefix(f.Name, ":") {
					t.Fatalf("accepted pseudo-header %q", f.Name)
				}
				regular++
			}
		}
		if methods != 1 || authorities != 1 {
			t.Fatalf("accepted %d :method and %d :authority", methods, authorities)
		}
		a := cr.Authority
		if !a.IsValid() || a.Port() == 0 || a.Addr().IsUnspecified() || a.Addr().Zone() != "" || a.Addr().Is4In6() {
			t.Fatalf("accepted authority %v", a)
		}
		if back, err := netip.ParseAddrPort(a.String()); err != nil || back != a {
			t.Fatalf("authority %v does not round-trip: %v", a, err)
		}
		n := 0
		for _, vs := range cr.Headers {
			n += len(vs)
		}
		if n != regular {
			t.Fatalf("kept %d header values of %d", n, regular)
		}
	})
}
