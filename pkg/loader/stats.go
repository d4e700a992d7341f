package loader

import (
	"fmt"
)

// Stats are the capture counters, summed over CPUs since the maps were
// created (they survive agent restarts; Uninstall resets them).
type Stats struct {
	Captured             uint64 // outbound connects redirected to the outbound listener
	PassedMark           uint64 // outbound connects of the agent's own (marked) sockets
	PassedLocal          uint64 // outbound connects to loopback or unspecified addresses
	PassedPort           uint64 // outbound connects to an excluded port
	PassedCIDR           uint64 // outbound connects to an excluded CIDR
	OrigAdded            uint64 // original destinations recorded at ESTABLISHED
	OrigRemoved          uint64 // original destinations removed when the agent's side closed
	InboundCaptured      uint64 // inbound SYNs steered to the inbound listener
	InboundPassedLocal   uint64 // inbound SYNs from loopback or the pod itself
	InboundPassedHBONE   uint64 // inbound SYNs to the HBONE port
	InboundPassedExempt  uint64 // inbound SYNs from an exempt source
	ErrPending           uint64 // original destination not recorded at connect (wr_pending update failed; passed uncaptured)
	ErrOrig              uint64 // original destination not recorded (wr_orig full or error)
	ErrNoInboundListener uint64 // enrolled netns with sk_lookup but no inbound listener
	ErrAssign            uint64 // the kernel refused to steer to the inbound listener
	PeerOriginal         uint64 // getpeername of a captured connection answered with its original destination
	SockPod              uint64 // getsockname of a captured connection answered with the pod's address
	SockNoPodAddr        uint64 // getsockname of a captured connection left alone: no pod address of its family
	TransparentAdded     uint64 // the agent's transparent connects (source preservation) recorded for sk_lookup
	InboundPassedTransp  uint64 // inbound SYNs of the agent's transparent connects passed to the app
	ErrTransparent       uint64 // a transparent connect not recorded (wr_tpass full): its SYN is steered and the agent refuses it
}

// Errors is the sum of the error counters.
func (s Stats) Errors() uint64 {
	return s.ErrPending + s.ErrOrig + s.ErrNoInboundListener + s.ErrAssign + s.ErrTransparent
}

// Events names every counter for metrics (warren_bpf_events_total{event=...}),
// next to the fields so that a new counter is exported where it is added.
func (s Stats) Events() map[string]uint64 {
	return map[string]uint64{
		"captured":                   s.Captured,
		"passed_mark":                s.PassedMark,
		"passed_local":               s.PassedLocal,
		"passed_port":                s.PassedPort,
		"passed_cidr":                s.PassedCIDR,
		"orig_added":                 s.OrigAdded,
		"orig_removed":               s.OrigRemoved,
		"inbound_captured":           s.InboundCaptured,
		"inbound_passed_local":       s.InboundPassedLocal,
		"inbound_passed_hbone":       s.InboundPassedHBONE,
		"inbound_passed_exempt":      s.InboundPassedExempt,
		"err_pending":                s.ErrPending,
		"err_orig":                   s.ErrOrig,
		"err_no_inbound_listener":    s.ErrNoInboundListener,
		"err_assign":                 s.ErrAssign,
		"peer_original":              s.PeerOriginal,
		"sock_pod":                   s.SockPod,
		"sock_no_pod_addr":           s.SockNoPodAddr,
		"transparent_added":          s.TransparentAdded,
		"inbound_passed_transparent": s.InboundPassedTransp,
		"err_transparent":            s.ErrTransparent,
	}
}

// Stats reads the per-CPU counters of wr_stats and sums them.
func (l *Loader) Stats() (Stats, error) {
	var perCPU []wrCounters
	if err := l.stats.Lookup(uint32(0), &perCPU); err != nil {
		return Stats{}, fmt.Errorf("read counters: %w", err)
	}
	var s Stats
	for _, c := range perCPU {
		s.Captured += c.Captured
		s.PassedMark += c.PassMark
		s.PassedLocal += c.PassLocal
		s.PassedPort += c.PassPort
		s.PassedCIDR += c.PassCidr
		s.OrigAdded += c.OrigAdd
		s.OrigRemoved += c.OrigDel
		s.InboundCaptured += c.InCaptured
		s.InboundPassedLocal += c.InPassLocal
		s.InboundPassedHBONE += c.InPassPort
		s.InboundPassedExempt += c.InPassExempt
		s.ErrPending += c.ErrPending
		s.ErrOrig += c.ErrOrig
		s.ErrNoInboundListener += c.ErrNoListener
		s.ErrAssign += c.ErrAssign
		s.PeerOriginal += c.PeerOrig
		s.SockPod += c.SockPod
		s.SockNoPodAddr += c.SockNoIp
		s.TransparentAdded += c.TpAdd
		s.InboundPassedTransp += c.InPassTp
		s.ErrTransparent += c.ErrTp
	}
	return s, nil
}
