package main

import (
	"log/slog"
	"os"
	"runtime/debug"
	"time"
)

// Memory: the Go runtime's soft limit from the container's limit.
//
// The agent's resident size follows its live heap and the collector's
// pace. At 100,000 workloads the configuration is a live heap of about
// 67 MiB (BENCHMARKS.md, Scale); with the default pace (GOGC=100) the
// resident size settled near 200 MiB under churn. Package gctune paces the
// collector for a large live heap (GOGC 25 above 64 MiB, checked every
// gctuneEvery), which holds it near 150 MiB at the price of more
// collections under heavy churn. The soft memory limit is the other
// bound, and a trade for the operator, not a default: the agent sets it
// to 90 % of the container's (--memory-limit, which the chart fills from
// the container's resources.limits.memory through the downward API;
// 512Mi by default, so 461 MiB, which binds at no mesh size measured), so
// that a limit set close to the live heap costs collector CPU instead of
// an OOM kill (measured with 140 MiB before gctune: 180–210 collections a
// minute at 1,000 deltas/s, 2.4× the CPU per delta). The other 10 % is
// for what the Go limit does not count: the binary's text, memory the
// kernel charges to the container (socket buffers, BPF maps).

// gctuneEvery is how often the agent re-reads its live heap to pace the
// collector (package gctune): a large view loaded is paced for memory
// within that time.
const gctuneEvery = 5 * time.Second

// memoryLimitShare is the part of the container's memory limit given to
// the Go runtime's soft limit.
const memoryLimitShare = 0.9

// softMemoryLimit returns the soft limit for a container limit of
// containerLimit bytes (0: none) and whether to set it: not without a
// container limit, and not when GOMEMLIMIT is set (the runtime applied
// it; an explicit setting wins).
func softMemoryLimit(containerLimit int64, gomemlimitSet bool) (int64, bool) {
	if containerLimit <= 0 || gomemlimitSet {
		return 0, false
	}
	return int64(float64(containerLimit) * memoryLimitShare), true
}

// applyMemoryLimit sets the runtime's soft memory limit from the
// container's limit (see softMemoryLimit) and logs what it did.
func applyMemoryLimit(containerLimit int64, log *slog.Logger) {
	env, gomemlimitSet := os.LookupEnv("GOMEMLIMIT")
	soft, ok := softMemoryLimit(containerLimit, gomemlimitSet)
	switch {
	case ok:
		debug.SetMemoryLimit(soft)
		log.Info("Go memory limit set from the container's", "containerLimitBytes", containerLimit, "softLimitBytes", soft)
	case gomemlimitSet && containerLimit > 0:
		log.Info("Go memory limit from GOMEMLIMIT, not from the container's limit", "GOMEMLIMIT", env, "containerLimitBytes", containerLimit)
	}
}
