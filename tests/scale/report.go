package scale

import (
	"fmt"
	"strings"
)

// Target is one figure of issue #18 and its bound.
type Target struct {
	Figure string
	Bound  string
	Got    string
	Met    bool
}

// Targets evaluates the targets on r.
// The store path's rows publish the mesh with NewSnapshot and churn it
// with store.Apply; the istiod provider's rows take the whole path of an
// agent in --provider=istiod mode, from an in-process delta ADS server.
func Targets(r *Report) []Target {
	ts := []Target{
		{"store path: RSS with the full view, loaded / after the churn", "≤ 150 MiB", fmt.Sprintf("%.0f / %.0f MiB (heap %.0f MiB, GC pace %d)", r.RSSFullMiB, r.RSSAfterMiB, r.HeapFullMiB, r.GCPercent),
			r.RSSFullMiB <= 150 && r.RSSAfterMiB <= 150},
		{"store path: initial apply", "≤ 2 s", fmt.Sprintf("%.2f s wall, %.2f s CPU", r.InitialWallS, r.InitialCPUS), r.InitialWallS <= 2},
		{"store path: one-workload delta visible, p99", "≤ 5 ms", fmt.Sprintf("%.2f ms", r.VisibleP99Us/1000), r.VisibleP99Us > 0 && r.VisibleP99Us <= 5000},
		{"store path: growth over the churn", "0", fmt.Sprintf("heap %+.2f MiB, goroutines %d → %d", r.HeapGrowthMiB, r.GoroutinesPre-3, r.GoroutinesEnd),
			r.GoroutinesEnd <= r.GoroutinesPre-3 && r.HeapGrowthMiB <= 0.05*r.HeapFullMiB+0.5},
	}
	if x := r.XDS; x != nil {
		growth := x.HeapAfterMiB - x.HeapPreMiB
		ts = append(ts,
			Target{"istiod provider: RSS with the full view, loaded / after its deltas (ADS server in the process)", "≤ 150 MiB",
				fmt.Sprintf("%.0f / %.0f MiB (heap %.0f MiB, GC pace %d)", x.RSSFullMiB, x.RSSAfterMiB, x.HeapFullMiB, x.GCPercent), x.RSSFullMiB <= 150 && x.RSSAfterMiB <= 150},
			Target{"istiod provider: first push applied", "≤ 2 s", fmt.Sprintf("%.2f s wall, %.2f s CPU", x.InitialWallS, x.InitialCPUS), x.InitialWallS <= 2},
			Target{"istiod provider: one-workload delta visible, p99", "≤ 5 ms", fmt.Sprintf("%.2f ms over %d deltas", x.VisibleP99Ms, x.Deltas), x.Deltas > 0 && x.VisibleP99Ms <= 5},
			Target{"istiod provider: growth over its deltas", "0", fmt.Sprintf("heap %+.2f MiB, goroutines %d → %d", growth, x.GoroutinesPre, x.GoroutinesEnd),
				x.GoroutinesEnd <= x.GoroutinesPre && growth <= 0.05*x.HeapFullMiB+0.5})
	}
	return ts
}

// Markdown renders r as the tables of BENCHMARKS.md.
func Markdown(r *Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "mesh: %d workloads (half dual-stack), %d services × 5 ports, %d policies; %s; %d CPUs, load average %s; %s\n\n",
		r.Mesh.Workloads, r.Mesh.Services, r.Mesh.Policies, r.Path, r.CPUs, r.LoadAvg, r.GoVersion)
	b.WriteString("| figure | target | measured | met |\n|---|---|---|---|\n")
	for _, t := range Targets(r) {
		met := "no"
		if t.Met {
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.Figure, t.Bound, t.Got, met)
	}
	b.WriteString("\n| figure | value |\n|---|---|\n")
	row := func(k string, f string, v ...any) { fmt.Fprintf(&b, "| %s | %s |\n", k, fmt.Sprintf(f, v...)) }
	row("RSS: before / full view / full view after debug.FreeOSMemory / after churn / peak", "%.0f / %.0f / %.0f / %.0f / %.0f MiB",
		r.RSSBaseMiB, r.RSSFullMiB, r.RSSScavMiB, r.RSSAfterMiB, r.RSSPeakMiB)
	m := r.After
	row("RSS after churn: anonymous / file-backed; Go heap objects / fragmentation / free, not returned / stacks / runtime", "%.0f / %.0f; %.0f / %.0f / %.0f / %.1f / %.0f MiB",
		m.RSSAnon, m.RSSFile, m.HeapObjects, m.HeapUnused, m.HeapFree, m.Stacks, m.Runtime)
	row("Go live heap: before / full view / churn start (sample buffers allocated) / churn end", "%.1f / %.1f / %.1f / %.1f MiB",
		r.HeapBaseMiB, r.HeapFullMiB, r.HeapPreMiB, r.HeapAfterMiB)
	row("live heap per workload (all kinds / workloads)", "%.0f B", r.BytesPerWL)
	row("initial apply (NewSnapshot + Publish)", "%.2f s wall, %.2f s CPU", r.InitialWallS, r.InitialCPUS)
	row("churn", "%d one-workload deltas of %d scheduled in %.0f s (%.1f %%/s); %d of the 10 ms ticks found it > 100 ms behind",
		r.Deltas, r.Scheduled, r.ChurnSecond, 100*r.ChurnRate, r.Behind)
	row("apply one delta p50 / p99 / max", "%.0f / %.0f / %.0f µs", r.ApplyP50Us, r.ApplyP99Us, r.ApplyMaxUs)
	row("visible to readers (apply + lookup) p50 / p99", "%.0f / %.0f µs", r.VisibleP50Us, r.VisibleP99Us)
	row("subscriber Diff p50 / p99", "%.0f / %.0f µs", r.DiffP50Us, r.DiffP99Us)
	row("reader lookup (VIP → endpoints → IP → policies) p50 / p99", "%.0f / %.0f ns over %d lookups, %d misses", r.LookupP50Ns, r.LookupP99Ns, r.Lookups, r.LookupMisses)
	row("CPU per 1,000 deltas (process, incl. readers, subscriber, GC)", "%.3f s", r.CPUPer1kS)
	row("bad items rejected alone (duplicate address, invalid address)", "%d", r.BadRejected)
	row("GC cycles during churn; live heap after the last GC at each quarter of it", "%d; %.1f / %.1f / %.1f / %.1f MiB",
		r.NumGC, r.HeapLiveMiB[0], r.HeapLiveMiB[1], r.HeapLiveMiB[2], r.HeapLiveMiB[3])
	if f := r.File; f != nil {
		row("local file: size, parse + validate", "%.1f MB, %.2f s wall, %.2f s CPU", f.MB, f.WallS, f.CPUS)
		row("local file: peak live heap while parsing (file included) / resulting snapshot", "%.0f / %.0f MiB", f.PeakMiB, f.ResultMiB)
	}
	if r.XDS != nil {
		b.WriteString(xdsMarkdown(r.XDS))
	}
	return b.String()
}
