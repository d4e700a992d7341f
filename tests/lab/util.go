package lab

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
)

const (
	netnsDir  = "/run/netns"
	bpffsRoot = "/sys/fs/bpf"
)

// noDAD turns off IPv6 duplicate address detection for the links a namespace
// creates afterwards: every lab address is unique by construction.
var noDAD = map[string]string{
	"net/ipv6/conf/all/accept_dad":     "0",
	"net/ipv6/conf/default/accept_dad": "0",
}

// addrAdd returns a + n, carrying across bytes.
func addrAdd(a netip.Addr, n int) netip.Addr {
	b := a.AsSlice()
	carry := n
	for i := len(b) - 1; i >= 0 && carry > 0; i-- {
		sum := int(b[i]) + carry
		b[i] = byte(sum)
		carry = sum >> 8
	}
	out, _ := netip.AddrFromSlice(b)
	return out
}

// addrSetByte returns a with byte i set to v.
func addrSetByte(a netip.Addr, i int, v byte) netip.Addr {
	b := a.AsSlice()
	b[i] = v
	out, _ := netip.AddrFromSlice(b)
	return out
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// writeSysctls writes values under /proc/sys of the calling thread's network namespace.
func writeSysctls(kv map[string]string) error {
	for _, k := range sortedNames(kv) {
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(kv[k]), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, kv[k], err)
		}
	}
	return nil
}
