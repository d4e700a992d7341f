package transparent

import (
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/warren-mesh/warren/internal/netnsx"
	"github.com/warren-mesh/warren/internal/testenv"
)

// scratchNS creates an unnamed network namespace with lo up and returns its
// handle.
func scratchNS(t *testing.T) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	if err := netnsx.Do(ns, func() error { return exec.Command("ip", "link", "set", "lo", "up").Run() }); err != nil {
		t.Fatal(err)
	}
	return ns
}

// state is what Setup may change: rules, routes of every table, the sysctl.
func state(t *testing.T, ns netns.NsHandle) string {
	t.Helper()
	var b strings.Builder
	err := netnsx.Do(ns, func() error {
		for _, args := range [][]string{{"-4", "rule"}, {"-6", "rule"}, {"-4", "route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"}} {
			out, err := exec.Command("ip", args...).CombinedOutput()
			if err != nil {
				return err
			}
			b.Write(out)
		}
		v, err := os.ReadFile(sysctlPath)
		b.WriteString("tcp_fwmark_accept=" + string(v))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestSetupTeardownRestoresEverything(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tt := range []struct {
		name      string
		preset    string // tcp_fwmark_accept before Setup
		opts      Options
		wantRules int
	}{
		{"both families, sysctl off", "0", Options{IPv4: true, IPv6: true}, 2},
		{"ipv4 only", "0", Options{IPv4: true}, 1},
		{"sysctl already on stays on", "1", Options{IPv4: true, IPv6: true}, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ns := scratchNS(t)
			if err := netnsx.Do(ns, func() error { return os.WriteFile(sysctlPath, []byte(tt.preset), 0o644) }); err != nil {
				t.Fatal(err)
			}
			before := state(t, ns)
			for i := range 2 { // enroll, then an agent restart enrolls again
				if err := Setup(ns, tt.opts); err != nil {
					t.Fatalf("setup %d: %v", i, err)
				}
			}
			if on, err := readSysctl(ns); err != nil || !on {
				t.Fatalf("tcp_fwmark_accept after setup: %v, %v", on, err)
			}
			h := state(t, ns)
			if n := strings.Count(h, "fwmark 0x53a lookup 1338"); n != tt.wantRules {
				t.Fatalf("want %d fwmark rules, got state:\n%s", tt.wantRules, h)
			}
			if !strings.Contains(h, "local default dev lo table 1338") {
				t.Fatalf("no local default route in table 1338:\n%s", h)
			}
			if err := Teardown(ns); err != nil {
				t.Fatal(err)
			}
			if after := state(t, ns); after != before {
				t.Fatalf("teardown left a difference:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			if err := Teardown(ns); err != nil {
				t.Fatalf("second teardown: %v", err)
			}
			// Re-enroll after unenroll.
			if err := Setup(ns, tt.opts); err != nil {
				t.Fatal(err)
			}
			if err := Teardown(ns); err != nil {
				t.Fatal(err)
			}
			if after := state(t, ns); after != before {
				t.Fatalf("re-enroll and teardown left a difference:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	testenv.RequireRoot(t)
	detail, err := Check()
	if err != nil {
		t.Fatal(err)
	}
	t.Log(detail)
}
