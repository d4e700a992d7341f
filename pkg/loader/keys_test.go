package loader

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"
)

func TestKeyLayout(t *testing.T) {
	// The sizes are those of bpf/lib/types.h; a drift breaks every lookup.
	for _, tt := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"wr_tuple", unsafe.Sizeof(wrTuple{}), 48},
		{"wr_dst", unsafe.Sizeof(wrDst{}), 24},
		{"wr_pend", unsafe.Sizeof(wrPend{}), 32},
		{"wr_pod", unsafe.Sizeof(wrPod{}), 8},
		{"wr_cidr", unsafe.Sizeof(wrCidr{}), 20},
		{"wr_exempt_key", unsafe.Sizeof(wrExemptKey{}), 20},
	} {
		if tt.got != tt.want {
			t.Errorf("sizeof %s = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
}

func TestAddr16(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want string // the 16 bytes as an IPv6 address
	}{
		{"198.18.0.1", "::ffff:198.18.0.1"},
		{"::ffff:198.18.0.1", "::ffff:198.18.0.1"},
		{"2001:2::1", "2001:2::1"},
		{"::1", "::1"},
		{"127.0.0.1", "::ffff:127.0.0.1"},
	} {
		got := netip.AddrFrom16(addr16(netip.MustParseAddr(tt.in)))
		if got != netip.MustParseAddr(tt.want) {
			t.Errorf("addr16(%s) = %s, want %s", tt.in, got, tt.want)
		}
		back := addrFrom16(addr16(netip.MustParseAddr(tt.in)))
		if back != netip.MustParseAddr(tt.in).Unmap() {
			t.Errorf("addrFrom16(addr16(%s)) = %s", tt.in, back)
		}
	}
}

func TestTupleKeyNormalised(t *testing.T) {
	// An IPv4 connection keys the same whether the agent's listener or the
	// client saw it as IPv4 or IPv4-mapped IPv6.
	a := tupleKey(7, netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:15001"))
	b := tupleKey(7, netip.MustParseAddrPort("[::ffff:127.0.0.1]:40000"), netip.MustParseAddrPort("[::ffff:127.0.0.1]:15001"))
	if a != b {
		t.Fatalf("v4 and v4-mapped keys differ: %+v vs %+v", a, b)
	}
	c := tupleKey(8, netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:15001"))
	if a == c {
		t.Fatal("keys of two namespaces are equal")
	}
	if a.Sport != 40000 || a.Dport != 15001 || a.Netns != 7 {
		t.Fatalf("key %+v", a)
	}
	// Raw layout as the kernel reads it: netns first, ports in host order.
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&a)), unsafe.Sizeof(a))
	if binary.NativeEndian.Uint64(raw[0:8]) != 7 || binary.NativeEndian.Uint16(raw[40:42]) != 40000 || binary.NativeEndian.Uint16(raw[42:44]) != 15001 {
		t.Fatalf("raw key % x", raw)
	}
}

func TestDstAddrPort(t *testing.T) {
	for _, s := range []string{"198.18.0.1:80", "[2001:2::1]:443", "198.19.255.255:65535"} {
		want := netip.MustParseAddrPort(s)
		var d wrDst
		d.Addr.B = addr16(want.Addr())
		d.Port = want.Port()
		if got := dstAddrPort(d); got != want {
			t.Errorf("dstAddrPort = %s, want %s", got, want)
		}
	}
}

func TestCidrKey(t *testing.T) {
	for _, tt := range []struct {
		in   string
		bits uint32
		addr string
	}{
		{"198.18.0.0/15", 111, "::ffff:198.18.0.0"},
		{"198.18.7.9/24", 120, "::ffff:198.18.7.0"},
		{"::ffff:198.18.0.0/111", 111, "::ffff:198.18.0.0"},
		{"2001:2::/48", 48, "2001:2::"},
		{"0.0.0.0/0", 96, "::ffff:0.0.0.0"},
	} {
		k := cidrKey(netip.MustParsePrefix(tt.in))
		if k.Prefixlen != tt.bits || netip.AddrFrom16(k.Addr.B) != netip.MustParseAddr(tt.addr) {
			t.Errorf("cidrKey(%s) = /%d %s, want /%d %s", tt.in, k.Prefixlen, netip.AddrFrom16(k.Addr.B), tt.bits, tt.addr)
		}
	}
}
