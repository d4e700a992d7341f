package loader

import (
	"fmt"
	"net/netip"
)

// Pure conversions between Go addresses and the BPF key layout; the C side
// is bpf/lib/types.h and bpf/lib/addr.h.

// Aliases of the bpf2go types: the layouts are defined once, in C.
type (
	wrTuple     = connectWrTuple
	wrDst       = connectWrDst
	wrPend      = connectWrPend
	wrPod       = connectWrPod
	wrCidr      = connectWrCidr
	wrExemptKey = connectWrExemptKey
	wrCounters  = connectWrCounters
	wrPodIP     = connectWrPodip
	wrTpKey     = connectWrTpKey
)

// podIPValue is the wr_pod_ip value of a pod's addresses: the first IPv4 and
// the first IPv6 (IPv4-mapped counts as IPv4); a family it lacks stays zero.
func podIPValue(addrs []netip.Addr) (wrPodIP, error) {
	var v wrPodIP
	var have4, have6 bool
	for _, a := range addrs {
		switch {
		case !a.IsValid() || a.IsUnspecified() || a.IsLoopback():
			return v, fmt.Errorf("pod address %q: not a pod address", a)
		case a.Unmap().Is4() && !have4:
			v.V4.B, have4 = addr16(a), true
		case !a.Unmap().Is4() && !have6:
			v.V6.B, have6 = addr16(a), true
		}
	}
	return v, nil
}

// addr16 is the 16-byte normal form: IPv4 (and IPv4-mapped IPv6) as ::ffff:a.b.c.d.
func addr16(a netip.Addr) [16]byte {
	return a.Unmap().As16()
}

// addrFrom16 reverses addr16: IPv4-mapped addresses come back as IPv4.
func addrFrom16(b [16]byte) netip.Addr {
	return netip.AddrFrom16(b).Unmap()
}

// tupleKey is the wr_orig key of a connection accepted by the agent: client
// is the accepted socket's remote end, listener its local end.
func tupleKey(netns uint64, client, listener netip.AddrPort) wrTuple {
	var k wrTuple
	k.Netns = netns
	k.Src.B = addr16(client.Addr())
	k.Dst.B = addr16(listener.Addr())
	k.Sport = client.Port()
	k.Dport = listener.Port()
	return k
}

// dstAddrPort decodes a wr_dst.
func dstAddrPort(d wrDst) netip.AddrPort {
	return netip.AddrPortFrom(addrFrom16(d.Addr.B), d.Port)
}

// cidrKey is the LPM key of a prefix: IPv4 prefixes are stored in the mapped
// range, so their length grows by 96 bits.
func cidrKey(p netip.Prefix) wrCidr {
	p = p.Masked()
	var k wrCidr
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	k.Prefixlen = uint32(bits)
	k.Addr.B = addr16(p.Addr())
	return k
}

// exemptKey is the wr_exempt key of a source address in a slot.
func exemptKey(slot uint32, a netip.Addr) wrExemptKey {
	var k wrExemptKey
	k.Slot = slot
	k.Addr.B = addr16(a)
	return k
}
