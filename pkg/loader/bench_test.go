package loader

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// bpfRuntime sums run time and run count of the programs behind the pinned
// cgroup links (needs BPF stats enabled).
func bpfRuntime(tb testing.TB, pinDir string) (time.Duration, uint64) {
	tb.Helper()
	var (
		total time.Duration
		runs  uint64
	)
	for _, pin := range []string{pinConnect4, pinConnect6, pinSockops, pinGetsockopt} {
		lk, err := link.LoadPinnedLink(filepath.Join(pinDir, pin), nil)
		if err != nil {
			tb.Fatal(err)
		}
		info, err := lk.Info()
		lk.Close()
		if err != nil {
			tb.Fatal(err)
		}
		prog, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			tb.Fatal(err)
		}
		st, err := prog.Stats()
		prog.Close()
		if err != nil {
			tb.Fatal(err)
		}
		total += st.Runtime
		runs += st.RunCount
		if testing.Verbose() {
			tb.Logf("%s: %d runs, %v", pin, st.RunCount, st.Runtime)
		}
	}
	return total, runs
}

// BenchmarkConnect measures socket+connect+close (RST, no TIME_WAIT) from a
// pod's netns to a loopback listener, with and without capture. The added
// cost of capture is "captured" minus "no-bpf"; "attached-not-enrolled" is
// what every other process on the node pays. Goal: at most 1 µs added.
//
// Wall-clock differences of a few hundred ns drown in the noise of a shared
// VM, so the BPF variants also report bpf-ns/op: the kernel's own run-time
// accounting (BPF_ENABLE_STATS, scoped to this benchmark) of connect4,
// connect6 and every sockops callback, divided by the connects made.
func BenchmarkConnect(b *testing.B) {
	out := netip.MustParseAddrPort("127.0.0.1:15001")
	for _, bc := range []struct {
		name   string
		load   bool
		enroll bool
		stats  bool
		dst    netip.AddrPort
	}{
		{"no-bpf", false, false, false, out},
		{"attached-not-enrolled", true, false, false, out},
		{"captured", true, true, false, netip.MustParseAddrPort("198.18.0.10:80")},
		{"attached-not-enrolled-bpfstats", true, false, true, out},
		{"captured-bpfstats", true, true, true, netip.MustParseAddrPort("198.18.0.10:80")},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var e *env
			if bc.load {
				e = newEnv(b, Config{})
			} else {
				e = newBareEnv(b)
			}
			ns := e.newNS("bench")
			ln := ns.listen(b, "tcp4", out.String())
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
			if bc.enroll {
				if _, err := e.l.Enroll(ns.path, EnrollOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			sa := sockaddr(bc.dst)
			b.ReportAllocs()
			var rt0 time.Duration
			if bc.stats {
				stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
				if err != nil {
					b.Fatalf("enable bpf stats: %v", err)
				}
				defer stats.Close()
				rt0, _ = bpfRuntime(b, e.pinDir)
			}
			err := ns.do(func() error {
				b.ResetTimer()
				for b.Loop() {
					fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
					if err != nil {
						return err
					}
					if err := unix.Connect(fd, sa); err != nil {
						unix.Close(fd)
						return err
					}
					_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
					unix.Close(fd)
				}
				b.StopTimer()
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			if bc.stats {
				rt, _ := bpfRuntime(b, e.pinDir)
				b.ReportMetric(float64(rt-rt0)/float64(b.N), "bpf-ns/op")
			}
		})
	}
}

// BenchmarkOriginalDst measures the agent's lookup for one accepted
// connection: getsockopt(SO_NETNS_COOKIE) plus one map lookup.
func BenchmarkOriginalDst(b *testing.B) {
	e := newEnv(b, Config{})
	p := e.outboundPod("pod")
	dst := netip.MustParseAddrPort("198.18.0.10:80")
	c, local, err := p.ns.dial(dst, dialOpts{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ac := next(b, p.in4, local)
	b.ReportAllocs()
	for b.Loop() {
		got, err := e.l.OriginalDst(ac)
		if err != nil || got != dst {
			b.Fatalf("%s, %v", got, err)
		}
	}
}
