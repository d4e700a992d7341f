package scale

import (
	"math/bits"
	"time"
)

// hist is a log-linear histogram of durations: 32 buckets per power of
// two, so a quantile is within 1/32 (3 %) of the true value, in a fixed
// 16 KiB whatever the number of samples. The churn records ~700,000
// timings; as slices of time.Duration they were 6–7 MiB of the process
// whose memory the benchmark reports.
type hist struct {
	n      int
	max    time.Duration
	counts [64 * histSub]uint32
}

const (
	histSubBits = 5
	histSub     = 1 << histSubBits
)

// bucket returns d's bucket: values below histSub ns have one each, then
// histSub per power of two.
func bucket(d time.Duration) int {
	v := uint64(max(d, 0))
	if v < histSub {
		return int(v)
	}
	e := bits.Len64(v) - 1 - histSubBits // v >> e is in [histSub, 2·histSub)
	return (e+1)*histSub + int(v>>e) - histSub
}

// upper returns the largest value of bucket b.
func upper(b int) time.Duration {
	if b < histSub {
		return time.Duration(b)
	}
	e := b/histSub - 1
	m := uint64(b%histSub + histSub)
	return time.Duration((m+1)<<e - 1)
}

func (h *hist) add(d time.Duration) {
	h.counts[bucket(d)]++
	h.n++
	h.max = max(h.max, d)
}

func (h *hist) merge(o *hist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// pct returns the p-th percentile (the upper end of its bucket, never more
// than the largest sample; p = 100 is that sample); 0 without samples.
func (h *hist) pct(p float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	if p >= 100 {
		return h.max
	}
	rank := int(float64(h.n-1)*p/100) + 1
	seen := 0
	for b, c := range h.counts {
		seen += int(c)
		if seen >= rank {
			return min(upper(b), h.max)
		}
	}
	return h.max
}
