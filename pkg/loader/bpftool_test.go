package loader

import (
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warren-mesh/warren/internal/testenv"
)

// TestBpftoolShowsFields checks that the pinned maps carry BTF, so that
// `bpftool map dump pinned <dir>/<map>` prints field names, and that every
// program and map is named wr_... within the kernel's 15 characters.
func TestBpftoolShowsFields(t *testing.T) {
	bpftool, err := exec.LookPath("bpftool")
	if err != nil {
		testenv.SkipOrFail(t, "bpftool not installed (make deps)")
	}
	e := newEnv(t, Config{ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.128.0/17")}})
	p := e.outboundPod("pod")
	c, local, err := p.ns.dial(netip.MustParseAddrPort("198.18.0.10:80"), dialOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	next(t, p.in4, local)

	for _, tt := range []struct {
		pin  string
		want []string
	}{
		{"wr_pods", []string{`"out_port": 15001`, `"slot"`}},
		{"wr_orig", []string{`"netns"`, `"sport"`, `"dport": 15001`, `"port": 80`}},
		{"wr_exc_cidr", []string{`"prefixlen": 113`}},
		{"wr_stats", []string{`"captured": 1`, `"err_assign": 0`}},
	} {
		out, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(e.pinDir, tt.pin)).CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool map dump %s: %v\n%s", tt.pin, err, out)
		}
		for _, w := range tt.want {
			if !strings.Contains(string(out), w) {
				t.Errorf("dump of %s lacks %s:\n%s", tt.pin, w, out)
			}
		}
	}
	for _, name := range mapNames() {
		if len(name) > 15 || !strings.HasPrefix(name, "wr_") {
			t.Errorf("map name %q: want wr_ prefix, at most 15 characters", name)
		}
	}
	out, err := exec.Command(bpftool, "cgroup", "show", e.cgroup).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool cgroup show: %v\n%s", err, out)
	}
	for _, prog := range []string{"wr_connect4", "wr_connect6", "wr_sockops"} {
		if !strings.Contains(string(out), prog) {
			t.Errorf("bpftool cgroup show lacks %s:\n%s", prog, out)
		}
	}
}
