package scale

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestHistBuckets(t *testing.T) {
	prev := -1
	for _, d := range []time.Duration{0, 1, 31, 32, 33, 63, 64, 65, 1000, time.Millisecond, time.Second, time.Hour} {
		b := bucket(d)
		if b < prev {
			t.Fatalf("bucket(%v) = %d, below the previous %d", d, b, prev)
		}
		if up := upper(b); up < d || (b > 0 && upper(b-1) >= d) {
			t.Fatalf("%v in bucket %d of (%v, %v]", d, b, upper(b-1), up)
		}
		prev = b
	}
}

// TestHistQuantiles compares the histogram's percentiles with the exact
// ones of the same samples: within the bucket width (1/32).
func TestHistQuantiles(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var h, a, b hist
	var all []time.Duration
	for i := range 100_000 {
		d := time.Duration(r.ExpFloat64() * float64(80*time.Microsecond))
		if i%1000 == 0 {
			d *= 50 // a tail
		}
		all = append(all, d)
		if i%2 == 0 {
			a.add(d)
		} else {
			b.add(d)
		}
	}
	h.merge(&a)
	h.merge(&b)
	slices.Sort(all)
	for _, p := range []float64{0, 50, 90, 99, 99.9, 100} {
		want := all[int(float64(len(all)-1)*p/100)]
		got := h.pct(p)
		if got < want || float64(got-want) > float64(want)/32+1 {
			t.Errorf("p%v = %v, exact %v", p, got, want)
		}
	}
	if h.n != len(all) {
		t.Fatalf("n = %d, want %d", h.n, len(all))
	}
	var empty hist
	if empty.pct(99) != 0 {
		t.Fatal("an empty histogram has a percentile")
	}
}
