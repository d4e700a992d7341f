package gctune

import (
	"context"
	"os"
	"runtime"
	"runtime/debug"
	"testing"
	"testing/synctest"
	"time"
)

type fakeRuntime struct {
	live    uint64
	percent int
	freed   int
}

func fake(rt *fakeRuntime) *Tuner {
	t := New(nil)
	t.off = false
	t.live = func() uint64 { return rt.live }
	t.setPercent = func(p int) int { old := rt.percent; rt.percent = p; return old }
	t.freeOS = func() { rt.freed++ }
	return t
}

func TestCheck(t *testing.T) {
	rt := &fakeRuntime{percent: DefaultPercent}
	tu := fake(rt)
	for i, step := range []struct {
		live    uint64
		changed bool
		percent int
		freed   int
	}{
		{10 << 20, false, DefaultPercent, 0},
		{Large - 1, false, DefaultPercent, 0},
		{Large, true, LargePercent, 1},      // the view grew: lower pace, memory returned once
		{200 << 20, false, LargePercent, 1}, // stays, no second FreeOSMemory
		{Small, false, LargePercent, 1},     // hysteresis: not below Small yet
		{Small - 1, true, DefaultPercent, 1},
		{Large - 1, false, DefaultPercent, 1},
		{Large + 1, true, LargePercent, 2},
	} {
		rt.live = step.live
		if got := tu.Check(); got != step.changed || rt.percent != step.percent || rt.freed != step.freed {
			t.Fatalf("step %d (live %d): changed %v percent %d freed %d; want %v %d %d",
				i, step.live, got, rt.percent, rt.freed, step.changed, step.percent, step.freed)
		}
	}
}

func TestGOGCWins(t *testing.T) {
	t.Setenv("GOGC", "200")
	rt := &fakeRuntime{percent: 200, live: 1 << 30}
	tu := New(nil)
	tu.live = func() uint64 { return rt.live }
	tu.setPercent = func(p int) int { rt.percent = p; return 0 }
	tu.freeOS = func() { rt.freed++ }
	if tu.Check() || rt.percent != 200 || rt.freed != 0 {
		t.Fatalf("with GOGC set the tuner changed the pace to %d (freed %d)", rt.percent, rt.freed)
	}
}

func TestRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{percent: DefaultPercent, live: 1 << 30}
		tu := fake(rt)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { tu.Run(ctx, 5*time.Second); close(done) }()
		time.Sleep(4 * time.Second)
		synctest.Wait()
		if rt.percent != DefaultPercent {
			t.Fatal("checked before the first interval")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if rt.percent != LargePercent {
			t.Fatalf("after one interval the pace is %d, want %d", rt.percent, LargePercent)
		}
		cancel()
		<-done
	})
}

// TestRealRuntime checks the Tuner against the runtime itself: a live heap
// above Large gets the lower pace.
func TestRealRuntime(t *testing.T) {
	if _, set := os.LookupEnv("GOGC"); set {
		t.Skip("GOGC is set")
	}
	held := make([][]byte, 0, 80)
	for range 80 {
		held = append(held, make([]byte, 1<<20))
	}
	runtime.GC()
	tu := New(nil)
	if !tu.Check() {
		t.Fatal("a live heap of 80 MiB did not change the pace")
	}
	if prev := debug.SetGCPercent(DefaultPercent); prev != LargePercent {
		t.Fatalf("the runtime's pace is %d, want %d", prev, LargePercent)
	}
	runtime.KeepAlive(held)
}
