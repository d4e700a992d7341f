package istioval

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
)

func TestPattern(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    config.StringMatch
		matches []string
		misses  []string
		err     string
	}{
		{in: "abc", want: config.StringMatch{Kind: config.MatchExact, Value: "abc"}, matches: []string{"abc"}, misses: []string{"abcd", ""}},
		{in: "abc*", want: config.StringMatch{Kind: config.MatchPrefix, Value: "abc"}, matches: []string{"abc", "abcd"}, misses: []string{"xabc"}},
		{in: "*abc", want: config.StringMatch{Kind: config.MatchSuffix, Value: "abc"}, matches: []string{"xabc", "abc"}, misses: []string{"abcx"}},
		{in: "*", want: config.StringMatch{Kind: config.MatchPresence}, matches: []string{"anything"}, misses: []string{""}},
		{in: "", err: "empty pattern"},
		{in: "a*b", err: `"*" is allowed only`},
		{in: "**", err: `"*" is allowed only`},
		{in: "*a*", err: `"*" is allowed only`},
		{in: " abc", err: "whitespace"},
		{in: "a b", err: "whitespace"},
	} {
		got, err := Pattern(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Pattern(%q) error = %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Pattern(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		if got.String() != tc.in {
			t.Errorf("Pattern(%q).String() = %q", tc.in, got.String())
		}
		for _, s := range tc.matches {
			if !got.Matches(s) {
				t.Errorf("%q should match %q", tc.in, s)
			}
		}
		for _, s := range tc.misses {
			if got.Matches(s) {
				t.Errorf("%q should not match %q", tc.in, s)
			}
		}
	}
}

func TestPrincipalTrimsSpiffe(t *testing.T) {
	for in, want := range map[string]config.StringMatch{
		"spiffe://td/ns/a/sa/b":  {Kind: config.MatchExact, Value: "td/ns/a/sa/b"},
		"spiffe://td/ns/a/*":     {Kind: config.MatchPrefix, Value: "td/ns/a/"},
		"*/sa/b":                 {Kind: config.MatchSuffix, Value: "/sa/b"},
		"td/ns/a/sa/b":           {Kind: config.MatchExact, Value: "td/ns/a/sa/b"},
		"spiffe://td/ns/*/sa/b*": {},
	} {
		got, err := Principal(in)
		if want == (config.StringMatch{}) {
			if err == nil || !strings.HasPrefix(err.Error(), "principal: ") {
				t.Errorf("Principal(%q) error = %v", in, err)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("Principal(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	if _, err := Namespace("a*b"); err == nil || !strings.HasPrefix(err.Error(), "namespace: ") {
		t.Errorf("Namespace(a*b) error = %v", err)
	}
}

func TestIPBlock(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{in: "10.0.0.0/8", want: "10.0.0.0/8"},
		{in: "10.1.2.3/8", want: "10.0.0.0/8"},
		{in: "198.18.0.1", want: "198.18.0.1/32"},
		{in: "2001:2::1", want: "2001:2::1/128"},
		{in: "2001:2::/48", want: "2001:2::/48"},
		{in: "::ffff:198.18.0.1", want: "198.18.0.1/32"},
		{in: "::ffff:198.18.0.0/112", want: "198.18.0.0/16"},
		{in: "::ffff:0:0/80", err: "/96 or longer"},
		{in: "10.0.0.0/33", err: `ip block "10.0.0.0/33"`},
		{in: "10.0.0.0/-1", err: `ip block "10.0.0.0/-1"`},
		{in: "10.0.0", err: "not an address or CIDR"},
		{in: "fe80::1%eth0", err: "zoned"},
		{in: "", err: "not an address or CIDR"},
		{in: "example.com", err: "not an address or CIDR"},
	} {
		got, err := IPBlock(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("IPBlock(%q) = %v, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != netip.MustParsePrefix(tc.want) {
			t.Errorf("IPBlock(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestPort(t *testing.T) {
	for in, want := range map[string]uint16{"1": 1, "80": 80, "65535": 65535, "0": 0, "65536": 0, "http": 0, "-1": 0, "": 0, " 80": 0, "0x50": 0} {
		got, err := Port(in)
		if want == 0 {
			if err == nil {
				t.Errorf("Port(%q) = %d, want an error", in, got)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("Port(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for in, ok := range map[int64]bool{1: true, 65535: true, 0: false, -1: false, 65536: false} {
		if _, err := PortNumber(in); (err == nil) != ok {
			t.Errorf("PortNumber(%d) error = %v", in, err)
		}
	}
}

func TestServiceAccount(t *testing.T) {
	for _, tc := range []struct{ in, err string }{
		{in: "ns/sa"},
		{in: "no-slash", err: "want namespace/name"},
		{in: "/sa", err: "empty namespace"},
		{in: "ns/", err: "empty name"},
		{in: "ns/sa/x", err: `name "sa/x"`},
		{in: "ns/*", err: `name "*"`},
		{in: "*/sa", err: `namespace "*"`},
		{in: "ns/s a", err: "whitespace"},
	} {
		got, err := ServiceAccount(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ServiceAccount(%q) = %+v, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != (config.ServiceAccountMatch{Namespace: "ns", ServiceAccount: "sa"}) {
			t.Errorf("ServiceAccount(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

func TestListReportsEveryBadValue(t *testing.T) {
	got, err := List([]string{"80", "http", "443", "0"}, Port)
	if err == nil || !strings.Contains(err.Error(), `[1]: port "http"`) || !strings.Contains(err.Error(), `[3]: port "0"`) {
		t.Fatalf("List error = %v", err)
	}
	if len(got) != 2 {
		t.Errorf("List parsed %v", got)
	}
	if got, err := List(nil, Port); err != nil || got != nil {
		t.Errorf("List(nil) = %v, %v", got, err)
	}
}
