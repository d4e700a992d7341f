package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// syncExclusions makes wr_exc_port and wr_exc_cidr hold exactly the
// configuration's ports and prefixes.
func (l *Loader) syncExclusions() error {
	const nports = 1 << 16
	keys := make([]uint32, nports)
	vals := make([]uint8, nports)
	for i := range keys {
		keys[i] = uint32(i)
	}
	for _, p := range l.cfg.ExcludePorts {
		vals[p] = 1
	}
	// One syscall for the whole array (batch operations: Linux 5.6).
	if _, err := l.excPort.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("update excluded ports: %w", err)
	}

	want := make(map[wrCidr]bool)
	for _, p := range l.cfg.ExcludeCIDRs {
		if !p.IsValid() {
			return fmt.Errorf("exclude cidr %v: invalid prefix", p)
		}
		want[cidrKey(p)] = true
	}
	var (
		k     wrCidr
		stale []wrCidr
	)
	it := l.excCIDR.Iterate()
	var v uint8
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list excluded cidrs: %w", err)
	}
	for _, k := range stale {
		if err := l.excCIDR.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete excluded cidr: %w", err)
		}
	}
	for k := range want {
		if err := l.excCIDR.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add excluded cidr: %w", err)
		}
	}
	return nil
}
