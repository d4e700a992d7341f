package loader

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

const soOriginalDst = 80 // SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST

// getOriginalDst asks the kernel, as an iptables-era proxy would.
func getOriginalDst(c *net.TCPConn, level int) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var (
		buf  [28]byte
		n    = uint32(len(buf))
		errn unix.Errno
	)
	if err := rc.Control(func(fd uintptr) {
		_, _, errn = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if errn != 0 {
		return netip.AddrPort{}, errn
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	switch fam := binary.NativeEndian.Uint16(buf[0:2]); {
	case fam == unix.AF_INET && n == 16:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case fam == unix.AF_INET6 && n == 28:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), nil
	}
	return netip.AddrPort{}, errors.New("bad sockaddr")
}

func TestGetsockoptOriginalDst(t *testing.T) {
	e := newEnv(t, Config{})
	p := e.outboundPod("pod")
	for _, tt := range []struct {
		name  string
		dst   string
		level int
		want  string
	}{
		{"ipv4 SOL_IP", "198.18.0.10:80", unix.SOL_IP, "198.18.0.10:80"},
		{"ipv4 SOL_IPV6 (mapped)", "198.18.0.10:81", unix.SOL_IPV6, "[::ffff:198.18.0.10]:81"},
		{"ipv6 SOL_IPV6", "[2001:2::10]:443", unix.SOL_IPV6, "[2001:2::10]:443"},
		{"ipv4-mapped SOL_IP", "[::ffff:198.18.0.11]:8080", unix.SOL_IP, "198.18.0.11:8080"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dst := netip.MustParseAddrPort(tt.dst)
			c, local, err := p.ns.dial(dst, dialOpts{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			in := p.in6
			if dst.Addr().Unmap().Is4() {
				in = p.in4
			}
			ac := next(t, in, local)
			got, err := getOriginalDst(ac, tt.level)
			if err != nil || got != netip.MustParseAddrPort(tt.want) {
				t.Fatalf("SO_ORIGINAL_DST = %s, %v; want %s", got, err, tt.want)
			}
		})
	}
	t.Run("ipv6 SOL_IP refused", func(t *testing.T) {
		c, local, err := p.ns.dial(netip.MustParseAddrPort("[2001:2::10]:443"), dialOpts{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ac := next(t, p.in6, local)
		if got, err := getOriginalDst(ac, unix.SOL_IP); err == nil {
			t.Fatalf("SO_ORIGINAL_DST at SOL_IP of an IPv6 destination = %s, want an error", got)
		}
	})
}
