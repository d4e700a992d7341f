package lab

import (
	"net/netip"
	"testing"
)

func TestAddressPlan(t *testing.T) {
	tests := []struct {
		in   string
		add  int
		want string
	}{
		{"198.18.0.0", 11, "198.18.0.11"},
		{"198.18.0.250", 10, "198.18.1.4"},
		{"2001:2::", 11, "2001:2::b"},
	}
	for _, tt := range tests {
		if got := addrAdd(netip.MustParseAddr(tt.in), tt.add); got.String() != tt.want {
			t.Errorf("addrAdd(%s, %d) = %s, want %s", tt.in, tt.add, got, tt.want)
		}
	}
	if got := addrSetByte(DefaultPodsV6.Addr(), 7, 2); got.String() != "2001:2:0:102::" {
		t.Errorf("node 2 IPv6 pod CIDR base = %s", got)
	}
	if got := addrSetByte(DefaultPodsV4.Addr(), 2, 2); got.String() != "198.19.2.0" {
		t.Errorf("node 2 IPv4 pod CIDR base = %s", got)
	}
}

func TestConfigValidation(t *testing.T) {
	good := Config{}
	if err := good.fill(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	if !prefixRE.MatchString(good.Prefix) {
		t.Fatalf("random prefix %q does not match %s", good.Prefix, prefixPattern)
	}
	bad := []Config{
		{Prefix: "wl12345"},
		{Prefix: "WL123456"},
		{UnderlayV4: netip.MustParsePrefix("198.17.0.0/24")},
		{UnderlayV4: netip.MustParsePrefix("198.18.0.0/14")},
		{UnderlayV6: netip.MustParsePrefix("2001:3::/64")},
		{PodsV6: netip.MustParsePrefix("2001:2:0:100::/64")},
		{UnderlayV4: netip.MustParsePrefix("2001:2::/64")},
	}
	for _, cfg := range bad {
		if err := cfg.fill(); err == nil {
			t.Errorf("fill(%+v) accepted", cfg)
		}
	}
}
