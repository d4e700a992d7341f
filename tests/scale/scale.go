package scale

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/warren-mesh/warren/internal/gctune"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/store"
)

// Options configure a run.
type Options struct {
	Mesh Mesh
	// ChurnRate is the fraction of workloads changed per second (0.01: 1 %/s).
	ChurnRate float64
	// ChurnFor is how long the churn lasts.
	ChurnFor time.Duration
	// Readers is the number of goroutines looking up workloads by IP and
	// services by VIP during the churn, each LookupRate lookups per second.
	Readers    int
	LookupRate int
	// File also measures the local-file provider on the mesh as one file,
	// after the churn.
	File bool
	// XDSDeltas, if positive, also feeds the mesh through the istiod
	// provider from an in-process delta ADS server, then that many
	// one-workload deltas paced at ChurnRate, after the churn.
	XDSDeltas int
	// HeapProfile, if set, receives a heap profile taken with the full view.
	HeapProfile string
	// Log receives progress lines; nil discards them.
	Log func(format string, args ...any)
}

// Report holds the measured figures.
type Report struct {
	Mesh        Mesh    `json:"mesh"`
	Path        string  `json:"path"`
	LoadAvg     string  `json:"load_avg"`
	CPUs        int     `json:"cpus"`
	GoVersion   string  `json:"go_version"`
	ChurnRate   float64 `json:"churn_rate"`
	ChurnSecond float64 `json:"churn_s"`

	// Before anything was built, with the full view, after the churn.
	RSSBaseMiB    float64 `json:"rss_base_mib"`
	RSSFullMiB    float64 `json:"rss_full_mib"`
	RSSPeakMiB    float64 `json:"rss_peak_mib"`
	RSSAfterMiB   float64 `json:"rss_after_churn_mib"`
	HeapBaseMiB   float64 `json:"heap_base_mib"`
	HeapFullMiB   float64 `json:"heap_full_mib"`
	HeapPreMiB    float64 `json:"heap_before_churn_mib"`
	HeapAfterMiB  float64 `json:"heap_after_churn_mib"`
	BytesPerWL    float64 `json:"bytes_per_workload"`
	InitialWallS  float64 `json:"initial_apply_wall_s"`
	InitialCPUS   float64 `json:"initial_apply_cpu_s"`
	Deltas        int     `json:"deltas"`
	Rejected      int     `json:"rejected"`
	BadRejected   int     `json:"bad_deltas_rejected"`
	Scheduled     int     `json:"deltas_scheduled"`
	Behind        int     `json:"ticks_behind"`
	RSSScavMiB    float64 `json:"rss_full_scavenged_mib"`
	ApplyP50Us    float64 `json:"apply_p50_us"`
	ApplyP99Us    float64 `json:"apply_p99_us"`
	ApplyMaxUs    float64 `json:"apply_max_us"`
	VisibleP50Us  float64 `json:"visible_p50_us"`
	VisibleP99Us  float64 `json:"visible_p99_us"`
	DiffP50Us     float64 `json:"subscriber_diff_p50_us"`
	DiffP99Us     float64 `json:"subscriber_diff_p99_us"`
	Changes       int     `json:"subscriber_diffs_timed"`
	LookupP50Ns   float64 `json:"lookup_p50_ns"`
	LookupP99Ns   float64 `json:"lookup_p99_ns"`
	Lookups       int64   `json:"lookups"`
	LookupMisses  int64   `json:"lookup_misses"`
	CPUPer1kS     float64 `json:"cpu_per_1k_deltas_s"`
	ChurnCPUS     float64 `json:"churn_cpu_s"`
	GoroutinesPre int     `json:"goroutines_before_churn"`
	GoroutinesEnd int     `json:"goroutines_after_churn"`
	HeapGrowthMiB float64 `json:"heap_growth_mib"`
	// HeapLiveMiB is the live heap after the last GC (runtime/metrics
	// /gc/heap/live:bytes) at each quarter of the churn: flat when nothing
	// accumulates.
	HeapLiveMiB [4]float64 `json:"heap_live_quarters_mib"`
	NumGC       uint32     `json:"gc_cycles"`
	// GCPercent is the collector's pace with the full view and during the
	// churn: what package gctune sets in the agent for this live heap.
	GCPercent int `json:"gc_percent"`
	// After is where the resident memory is after the churn.
	After MemBreakdown `json:"memory_after_churn"`

	File *FileReport `json:"file,omitempty"`
	XDS  *XDSReport  `json:"xds,omitempty"`
}

const mib = 1 << 20

// Run builds the mesh, publishes it to a store as the first configuration,
// then churns it with one-workload deltas through store.Apply (the
// incremental path a delta-xDS provider uses) while readers look up
// workloads and VIPs on store.Current and a subscriber follows the change
// feed, and measures.
func Run(ctx context.Context, o Options) (*Report, error) {
	logf := o.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}
	m := o.Mesh
	m.defaults()
	r := &Report{Mesh: m, Path: "config.NewSnapshot + store.Publish, then store.Apply per delta", LoadAvg: loadAvg(),
		CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), ChurnRate: o.ChurnRate, ChurnSecond: o.ChurnFor.Seconds()}
	r.HeapBaseMiB, r.RSSBaseMiB = settle()

	// Initial view: the provider's decoded Config (which it then drops),
	// validated and indexed, published.
	c := m.Config()
	cpu0, t0 := cpuTime(), time.Now()
	snap, err := config.NewSnapshot(c, config.Options{Node: LocalNode, CheckNetns: okPath, CheckCgroup: okPath})
	if err != nil {
		return nil, fmt.Errorf("initial snapshot: %w", err)
	}
	st := store.New(LocalNode)
	st.Publish(snap)
	r.InitialWallS, r.InitialCPUS = time.Since(t0).Seconds(), (cpuTime() - cpu0).Seconds()
	runtime.KeepAlive(c)                             // dropped here: the provider's copy is not the agent's view
	defer debug.SetGCPercent(gcPercent()) // Run may change the pace as the agent does; this process gets its own back
	r.GCPercent = paceLikeTheAgent()
	r.HeapFullMiB, r.RSSFullMiB = settle()
	debug.FreeOSMemory()
	r.RSSScavMiB = procStatus("VmRSS")
	r.BytesPerWL = (r.HeapFullMiB - r.HeapBaseMiB) * mib / float64(m.Workloads)
	logf("initial view: %d workloads, %d services, %d policies in %.2f s (%.2f s CPU); heap %.1f MiB, RSS %.1f MiB",
		m.Workloads, m.Services, m.Policies, r.InitialWallS, r.InitialCPUS, r.HeapFullMiB, r.RSSFullMiB)
	if o.HeapProfile != "" {
		if err := writeHeapProfile(o.HeapProfile); err != nil {
			return nil, err
		}
	}

	// Churn.
	gens := make([]uint32, m.Workloads)
	rng := rand.New(rand.NewPCG(18, 18))
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	// Every sample histogram is allocated before the baseline: what grows
	// after it is the configuration path's.
	perSecond := o.ChurnRate * float64(m.Workloads)
	var apply, visible, diffs hist
	lookups := make([]hist, o.Readers)
	var nLookups, misses atomic.Int64
	for k := range o.Readers {
		wg.Go(func() { reader(runCtx, st, &m, k, o.LookupRate, &lookups[k], &nLookups, &misses) })
	}
	sub := st.Subscribe()
	wg.Go(func() { subscriber(runCtx, sub, &diffs) })
	time.Sleep(50 * time.Millisecond)
	r.HeapPreMiB, _ = settle()
	r.GoroutinesPre = runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	gc0 := ms.NumGC

	cpu0, start := cpuTime(), time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	live := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	for time.Since(start) < o.ChurnFor && ctx.Err() == nil {
		<-tick.C
		if q := int(4 * time.Since(start) / o.ChurnFor); q < 4 {
			metrics.Read(live)
			r.HeapLiveMiB[q] = float64(live[0].Value.Uint64()) / mib
		}
		owed := perSecond*time.Since(start).Seconds() - float64(r.Deltas+r.Rejected)
		if owed > perSecond/10 { // more than 100 ms behind the schedule
			r.Behind++
		}
		for ; owed >= 1; owed-- {
			i := rng.IntN(m.Workloads)
			old := m.Workload(i, gens[i])
			gens[i]++
			nw := m.Workload(i, gens[i])
			d := config.Delta{Workloads: []*config.Workload{nw}}
			if nw.UID != old.UID { // a replaced pod; else a restart in place (new address, same UID)
				d.RemovedWorkloads = []string{old.UID}
			}
			t := time.Now()
			_, rejected := st.Apply(d)
			ta := time.Since(t)
			w, ok := st.Current().WorkloadByIP("", nw.WorkloadIPs[0])
			tv := time.Since(t)
			if len(rejected) > 0 || !ok || w.UID != nw.UID {
				r.Rejected++
				continue
			}
			apply.add(ta)
			visible.add(tv)
			r.Deltas++
			if r.Deltas%100 == 0 { // bad input at scale: rejected alone, the rest goes on
				if n := badDeltas(st, &m, i, r.Deltas); n < 0 {
					return r, errors.New("a delta with bad items did not apply its good one alone")
				} else {
					r.BadRejected += n
				}
			}
		}
	}
	tick.Stop()
	churn := time.Since(start)
	r.Scheduled = int(perSecond * churn.Seconds())
	r.ChurnCPUS = (cpuTime() - cpu0).Seconds()
	stop()
	wg.Wait()
	sub.Close()
	r.ChurnSecond = churn.Seconds()
	if r.Deltas > 0 {
		r.CPUPer1kS = r.ChurnCPUS / float64(r.Deltas) * 1000
	}
	runtime.ReadMemStats(&ms)
	r.NumGC = ms.NumGC - gc0
	r.HeapAfterMiB, r.RSSAfterMiB = settle() // the sample buffers still held, as at the baseline
	r.After = memBreakdown()
	if o.HeapProfile != "" {
		if err := writeHeapProfile(o.HeapProfile + ".churn"); err != nil {
			return r, err
		}
	}
	r.GoroutinesEnd = runtime.NumGoroutine()
	r.HeapGrowthMiB = r.HeapAfterMiB - r.HeapPreMiB
	r.ApplyP50Us, r.ApplyP99Us, r.ApplyMaxUs = us(apply.pct(50)), us(apply.pct(99)), us(apply.pct(100))
	r.VisibleP50Us, r.VisibleP99Us = us(visible.pct(50)), us(visible.pct(99))
	r.DiffP50Us, r.DiffP99Us, r.Changes = us(diffs.pct(50)), us(diffs.pct(99)), diffs.n
	var all hist
	for k := range lookups {
		all.merge(&lookups[k])
	}
	r.LookupP50Ns, r.LookupP99Ns = float64(all.pct(50)), float64(all.pct(99))
	r.Lookups, r.LookupMisses = nLookups.Load(), misses.Load()
	r.RSSPeakMiB = procStatus("VmHWM")
	if n := st.Current().NumWorkloads(); n != m.Workloads {
		return r, fmt.Errorf("after the churn: %d workloads, want %d", n, m.Workloads)
	}
	logf("churn: %d deltas in %.1f s (%d rejected, %d bad ones rejected alone, %d ticks behind); apply p50 %.0f µs p99 %.0f µs; visible p99 %.0f µs; CPU %.3f s per 1,000 deltas; heap %+.2f MiB, goroutines %d -> %d",
		r.Deltas, r.ChurnSecond, r.Rejected, r.BadRejected, r.Behind, r.ApplyP50Us, r.ApplyP99Us, r.VisibleP99Us, r.CPUPer1kS, r.HeapGrowthMiB, r.GoroutinesPre, r.GoroutinesEnd)
	if o.File {
		f, err := ParseFile(m)
		if err != nil {
			return nil, err
		}
		r.File = f
		logf("local file: %.1f MB parsed and validated in %.2f s (%.2f s CPU), peak heap %.0f MiB, snapshot %.0f MiB",
			f.MB, f.WallS, f.CPUS, f.PeakMiB, f.ResultMiB)
	}
	if o.XDSDeltas > 0 {
		x, err := RunXDS(ctx, m, o.XDSDeltas, o.ChurnRate)
		if err != nil {
			return nil, err
		}
		r.XDS = x
		logf("istiod provider: first push applied in %.2f s (%.2f s CPU), RSS %.0f MiB, heap %.0f MiB; %d one-workload deltas visible p50 %.2f ms, p99 %.2f ms, %.3f s CPU per 1,000",
			x.InitialWallS, x.InitialCPUS, x.RSSFullMiB, x.HeapFullMiB, x.Deltas, x.VisibleP50Ms, x.VisibleP99Ms, 1000*x.CPUPerDeltaS)
	}

	return r, nil
}

// badDeltas sends one delta holding a workload that claims slot i's
// address, one with an invalid (unparseable) address, and a valid new
// workload, and checks that the two bad items are rejected alone and the
// valid one is applied (then removes it). It returns the number of bad items
// rejected, or -1 when the store did not behave so.
func badDeltas(st *store.Store, m *Mesh, i, n int) int {
	cur := st.Current()
	victim, ok := cur.WorkloadByIP("", m.Workload(i, 0).WorkloadIPs[0])
	if !ok {
		victim, ok = cur.WorkloadByIP("", m.Workload(i, 1).WorkloadIPs[0])
	}
	if !ok {
		return -1
	}
	dup := m.Workload(i, 7)
	dup.UID, dup.WorkloadIPs = "bad-dup", victim.WorkloadIPs
	invalid := m.Workload(i, 7)
	invalid.UID, invalid.WorkloadIPs = "bad-ip", []netip.Addr{{}}
	good := m.Workload(i, 7)
	good.UID, good.WorkloadIPs = fmt.Sprint("extra-", n), []netip.Addr{netip.AddrFrom4([4]byte{11, byte(n >> 16), byte(n >> 8), byte(n)})}
	_, rejected := st.Apply(config.Delta{Workloads: []*config.Workload{dup, invalid, good}})
	if w, ok := st.Current().WorkloadByIP("", good.WorkloadIPs[0]); len(rejected) != 2 || !ok || w.UID != good.UID {
		return -1
	}
	if _, rej := st.Apply(config.Delta{RemovedWorkloads: []string{good.UID}}); len(rej) > 0 {
		return -1
	}
	return len(rejected)
}

func okPath(string) error { return nil }

func reader(ctx context.Context, st *store.Store, m *Mesh, k, rate int, out *hist, n, misses *atomic.Int64) {
	rng := rand.New(rand.NewPCG(uint64(k), 7))
	every := time.Second / time.Duration(max(rate/100, 1)) // bursts of 100
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for range 100 {
			j := rng.IntN(m.Services)
			vip := m.Service(j).VIPs[0].Addr
			start := time.Now()
			snap := st.Current()
			svc, ok := snap.ServiceByAddr("", vip)
			if ok {
				eps := snap.Endpoints(svc)
				if len(eps) > 0 {
					w := eps[rng.IntN(len(eps))].Workload
					_, ok = snap.WorkloadByIP(w.Network, w.WorkloadIPs[0])
					_ = snap.PoliciesFor(w)
				}
			}
			out.add(time.Since(start))
			n.Add(1)
			if !ok {
				misses.Add(1)
			}
		}
	}
}

// subscriber follows the change feed as the agent's enrollment loop does;
// it records the time store.Diff takes for every tenth change (timed
// again outside Next, which also waits).
func subscriber(ctx context.Context, sub *store.Subscription, out *hist) {
	for n := 0; ; n++ {
		ch, err := sub.Next(ctx)
		if err != nil {
			return
		}
		if n%10 == 0 {
			t := time.Now()
			_ = store.Diff(ch.Old, ch.New)
			out.add(time.Since(t))
		}
	}
}

// paceLikeTheAgent does what the agent's gctune.Tuner does within its
// interval after a view is loaded: read the live heap after a collection
// and pace the collector for it. It returns the pace.
func paceLikeTheAgent() int {
	runtime.GC()
	gctune.New(nil).Check()
	return gcPercent()
}

// gcPercent returns the collector's pace (debug.SetGCPercent can only
// read it by setting it; it is set back at once).
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

// settle collects garbage and returns the live heap and RSS in MiB.
func settle() (heap, rss float64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapAlloc) / mib, procStatus("VmRSS")
}

// MemBreakdown splits the resident memory (MiB): the kernel's anonymous
// and file-backed pages, and the Go runtime's classes (runtime/metrics
// /memory/classes/...).
type MemBreakdown struct {
	RSSAnon     float64 `json:"rss_anon_mib"`
	RSSFile     float64 `json:"rss_file_mib"`
	HeapObjects float64 `json:"heap_objects_mib"`
	// HeapUnused is free space inside spans that hold objects (fragmentation).
	HeapUnused float64 `json:"heap_unused_mib"`
	// HeapFree is free spans not yet returned to the OS.
	HeapFree float64 `json:"heap_free_mib"`
	Stacks   float64 `json:"stacks_mib"`
	// Runtime is the runtime's own metadata and other memory.
	Runtime float64 `json:"runtime_mib"`
}

func memBreakdown() MemBreakdown {
	names := []string{
		"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes", "/memory/classes/heap/free:bytes",
		"/memory/classes/heap/stacks:bytes", "/memory/classes/os-stacks:bytes", "/memory/classes/metadata/other:bytes",
		"/memory/classes/metadata/mspan/inuse:bytes", "/memory/classes/metadata/mcache/inuse:bytes",
		"/memory/classes/other:bytes", "/memory/classes/profiling/buckets:bytes",
	}
	ss := make([]metrics.Sample, len(names))
	for i, n := range names {
		ss[i].Name = n
	}
	metrics.Read(ss)
	v := func(i int) float64 {
		if ss[i].Value.Kind() != metrics.KindUint64 {
			return 0
		}
		return float64(ss[i].Value.Uint64()) / mib
	}
	return MemBreakdown{
		RSSAnon: procStatus("RssAnon"), RSSFile: procStatus("RssFile"),
		HeapObjects: v(0), HeapUnused: v(1), HeapFree: v(2), Stacks: v(3) + v(4),
		Runtime: v(5) + v(6) + v(7) + v(8) + v(9),
	}
}

// procStatus returns a /proc/self/status field in MiB (0 when unknown).
func procStatus(field string) float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("heap profile: %w", err)
	}
	runtime.GC()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return fmt.Errorf("heap profile: %w", err)
	}
	return errors.Join(f.Close())
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }
