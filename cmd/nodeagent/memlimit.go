package main

import (
	"log/slog"
	"os"
	"runtime/debug"
)

// Memory: the Go runtime's soft limit from the container's limit.
//
// At 100,000 workloads the agent's configuration is a live heap of about
// 78 MiB (BENCHMARKS.md, Scale). With GOGC=100 the heap grows to twice
// its live size between collections, so the resident size settles near
// 220 MiB under churn, whatever the agent does once: debug.FreeOSMemory
// after the first snapshot returns the build's garbage (221 → 135 MiB in
// the scale benchmark), but the first minute of churn takes the heap back
// to GOGC's goal (220 MiB), so the agent does not call it. What holds the
// resident size is a soft memory limit (debug.SetMemoryLimit): measured
// with 140 MiB, the resident size stays at 148–149 MiB, but the collector
// then runs 180–210 times a minute at 1,000 deltas/s and a delta costs
// 2.4× the CPU (0.70 instead of 0.25–0.33 ms, collection included), the
// initial view 5.5–6.9 instead of 1.3–2.0 s of CPU. That is a trade for
// the operator, not a default: the agent sets the limit to 90 % of the
// container's (--memory-limit, which the chart fills from the container's
// resources.limits.memory through the downward API; 512Mi by default, so
// 461 MiB, which binds at no mesh size measured), so that a limit set
// close to the live heap costs collector CPU instead of an OOM kill. The
// other 10 % is for what the Go limit does not count: the binary's text,
// memory the kernel charges to the container (socket buffers, BPF maps).

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
