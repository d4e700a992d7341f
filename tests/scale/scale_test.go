package scale

import (
	"context"
	"encoding/json"
	"testing"
	"time"
)

// TestScaleShort runs the scale benchmark at 1/20 of the mesh
// (5,000 workloads, 1,000 services, 250 policies) with a 10 s churn of
// 5 %/s, to keep it working: it checks that every figure was measured and
// that the churn leaves no goroutine and no heap behind, never how fast
// anything is.
func TestScaleShort(t *testing.T) {
	if testing.Short() {
		t.Skip("about 15 s; skipped with -short")
	}
	pace := gcPercent()
	r, err := Run(context.Background(), Options{
		Mesh: Short, File: true, XDSDeltas: 20, ChurnRate: 0.05, ChurnFor: 10 * time.Second, Readers: 2, LookupRate: 2000,
		Log: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	js, _ := json.MarshalIndent(r, "", "  ")
	t.Logf("%s\n%s", js, Markdown(r))
	// The short mesh is far below gctune.Large: the churn runs at the
	// process's own pace, and Run leaves that pace as it found it.
	if r.GCPercent != pace || r.XDS.GCPercent != pace || gcPercent() != pace {
		t.Errorf("GC pace %d during the churn, %d in the istiod part, %d after Run; want the process's %d throughout",
			r.GCPercent, r.XDS.GCPercent, gcPercent(), pace)
	}
	if r.Deltas < 100 || r.ApplyP99Us <= 0 || r.VisibleP99Us <= 0 || r.CPUPer1kS <= 0 || r.Lookups == 0 || r.BytesPerWL <= 0 {
		t.Errorf("figures missing: %+v", r)
	}
	if r.XDS == nil || r.XDS.Deltas != 20 || r.XDS.InitialWallS <= 0 || r.XDS.VisibleP99Ms <= 0 || r.XDS.RSSFullMiB <= 0 {
		t.Fatalf("istiod provider figures missing: %+v", r.XDS)
	}
	if r.XDS.GoroutinesEnd > r.XDS.GoroutinesPre {
		t.Errorf("istiod provider: goroutines %d before its deltas, %d after", r.XDS.GoroutinesPre, r.XDS.GoroutinesEnd)
	}
	if r.File == nil || r.File.PeakMiB <= 0 {
		t.Errorf("local file figures missing: %+v", r.File)
	}
	if r.BadRejected == 0 || r.Rejected > 0 {
		t.Errorf("bad items rejected %d (want > 0), good deltas rejected %d (want 0)", r.BadRejected, r.Rejected)
	}
	if r.LookupMisses > 0 {
		t.Errorf("%d of %d lookups missed during the churn", r.LookupMisses, r.Lookups)
	}
	if r.GoroutinesEnd > r.GoroutinesPre-3 { // readers and the subscriber ended; nothing else may remain
		t.Errorf("goroutines: %d before the churn (with 3 of its own), %d after", r.GoroutinesPre, r.GoroutinesEnd)
	}
	// The same mesh size before and after: the live heap may move by GC
	// noise and the unique map's epochs, not grow with the number of deltas.
	if limit := 0.05*r.HeapFullMiB + 0.5; r.HeapGrowthMiB > limit {
		t.Errorf("heap grew %.2f MiB over the churn (limit %.2f)", r.HeapGrowthMiB, limit)
	}
}
