package caserver

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// limiter is a token bucket per caller key. Buckets idle for longer than
// idle are forgotten (a full bucket is the same as a new one).
type limiter struct {
	rate  rate.Limit
	burst int
	idle  time.Duration

	mu        sync.Mutex
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	l    *rate.Limiter
	last time.Time
}

func newLimiter(r rate.Limit, burst int) *limiter {
	idle := time.Minute
	if r > 0 {
		// Long enough for an empty bucket to refill.
		if d := time.Duration(float64(burst) / float64(r) * float64(time.Second)); d > idle {
			idle = d
		}
	}
	return &limiter{rate: r, burst: burst, idle: idle, buckets: map[string]*bucket{}}
}

// allow takes a token from key's bucket at now; when there is none it
// returns how long until there will be one.
func (l *limiter) allow(key string, now time.Time) (bool, time.Duration) {
	if l.rate == rate.Inf {
		return true, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > l.idle {
		for k, b := range l.buckets {
			if now.Sub(b.last) > l.idle {
				delete(l.buckets, k)
			}
		}
		l.lastSweep = now
	}
	b := l.buckets[key]
	if b == nil {
		b = &bucket{l: rate.NewLimiter(l.rate, l.burst)}
		l.buckets[key] = b
	}
	b.last = now
	r := b.l.ReserveN(now, 1)
	if !r.OK() {
		return false, time.Second
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}
