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
	ErrPending           uint64 // original destination not recorded at connect (passed uncaptured)
	ErrOrig              uint64 // original destination not recorded (wr_orig full or error)
	ErrNoInboundListener uint64 // enrolled netns with sk_lookup but no inbound listener
	ErrAssign            uint64 // the kernel refused to steer to the inbound listener
}

// Errors is the sum of the error counters.
func (s Stats) Errors() uint64 {
	return s.ErrPending + s.ErrOrig + s.ErrNoInboundListener + s.ErrAssign
}

// Stats reads the per-CPU counters of wr_stats.
func (l *Loader) Stats() (Stats, error) {
	var s Stats
	fields := map[wrStat]*uint64{
		connectWrStatWR_STAT_CAPTURED:        &s.Captured,
		connectWrStatWR_STAT_PASS_MARK:       &s.PassedMark,
		connectWrStatWR_STAT_PASS_LOCAL:      &s.PassedLocal,
		connectWrStatWR_STAT_PASS_PORT:       &s.PassedPort,
		connectWrStatWR_STAT_PASS_CIDR:       &s.PassedCIDR,
		connectWrStatWR_STAT_ORIG_ADD:        &s.OrigAdded,
		connectWrStatWR_STAT_ORIG_DEL:        &s.OrigRemoved,
		connectWrStatWR_STAT_IN_CAPTURED:     &s.InboundCaptured,
		connectWrStatWR_STAT_IN_PASS_LOCAL:   &s.InboundPassedLocal,
		connectWrStatWR_STAT_IN_PASS_PORT:    &s.InboundPassedHBONE,
		connectWrStatWR_STAT_IN_PASS_EXEMPT:  &s.InboundPassedExempt,
		connectWrStatWR_STAT_ERR_PENDING:     &s.ErrPending,
		connectWrStatWR_STAT_ERR_ORIG:        &s.ErrOrig,
		connectWrStatWR_STAT_ERR_NO_LISTENER: &s.ErrNoInboundListener,
		connectWrStatWR_STAT_ERR_ASSIGN:      &s.ErrAssign,
	}
	if len(fields) != int(connectWrStatWR_STAT_MAX) {
		return s, fmt.Errorf("stats: %d counters in Go, %d in C", len(fields), connectWrStatWR_STAT_MAX)
	}
	var perCPU []uint64
	for k, dst := range fields {
		if err := l.stats.Lookup(k, &perCPU); err != nil {
			return s, fmt.Errorf("read counter %d: %w", k, err)
		}
		for _, v := range perCPU {
			*dst += v
		}
	}
	return s, nil
}
