// Package gctune paces the Go collector by the size of the agent's live
// heap.
//
// With the runtime's default pace (GOGC=100) the heap grows to twice its
// live size between collections, and the resident size follows. For a
// small agent that is a few MiB and the right trade. For an agent holding
// a large mesh it is not: at 100,000 workloads the configuration is a
// live heap of ~70 MiB and, under churn, the resident size settles near
// 200 MiB, most of it headroom and holes left in spans by the garbage of
// deltas (BENCHMARKS.md, Scale). So a Tuner keeps the default while the
// live heap is small and, once it passes Large, sets a lower pace
// (LargePercent: the heap may grow by a quarter of its live size) and
// returns the memory freed so far to the OS once; it goes back to the
// default below Small (hysteresis, so a heap near the bound does not
// flip). The collector then runs more often under heavy churn: it costs
// CPU in proportion to the rate of change, not to the mesh's size.
//
// An explicit GOGC in the environment wins: the Tuner then does nothing.
// The soft memory limit (GOMEMLIMIT, the agent's --memory-limit) is
// independent of it and still applies.
package gctune

import (
	"context"
	"log/slog"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Defaults.
const (
	// Large is the live heap above which the Tuner lowers the pace.
	Large = 64 << 20
	// Small is the live heap below which it restores the default.
	Small = 48 << 20
	// DefaultPercent is the runtime's default pace (GOGC=100).
	DefaultPercent = 100
	// LargePercent is the pace for a large live heap.
	LargePercent = 25
)

// Tuner sets the collector's pace from the live heap. Its zero value is
// not usable; see New.
type Tuner struct {
	log   *slog.Logger
	large bool
	off   bool

	// The runtime, replaced by fakes in tests.
	live       func() uint64
	setPercent func(int) int
	freeOS     func()
}

// New returns a Tuner for this process; it does nothing when GOGC is set
// in the environment. log may be nil.
func New(log *slog.Logger) *Tuner {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	_, gogc := os.LookupEnv("GOGC")
	return &Tuner{log: log, off: gogc, live: liveHeap, setPercent: debug.SetGCPercent, freeOS: debug.FreeOSMemory}
}

func liveHeap() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

// Check reads the live heap (as of the last collection) and changes the
// pace if it crossed a bound. It reports whether it changed it.
func (t *Tuner) Check() bool {
	if t.off {
		return false
	}
	live := t.live()
	switch {
	case !t.large && live >= Large:
		t.large = true
		t.setPercent(LargePercent)
		t.freeOS() // the garbage of building the large view, returned once
		t.log.Info("large live heap: collector paced for memory", "liveHeapBytes", live, "gcPercent", LargePercent)
		return true
	case t.large && live < Small:
		t.large = false
		t.setPercent(DefaultPercent)
		t.log.Info("live heap small again: default collector pace", "liveHeapBytes", live, "gcPercent", DefaultPercent)
		return true
	}
	return false
}

// Run calls Check every interval until ctx ends.
func (t *Tuner) Run(ctx context.Context, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			t.Check()
		}
	}
}
