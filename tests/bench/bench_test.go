package bench

import (
	"context"
	"os/exec"
	"testing"

	"github.com/warren-mesh/warren/internal/testenv"
)

// TestBenchShort runs the harness in short mode to keep it working: every
// scenario on every path once, with short durations. It checks that each
// produced its figures, never how fast they are.
func TestBenchShort(t *testing.T) {
	testenv.RequireRoot(t)
	for _, bin := range []string{"stunnel4", "haproxy"} {
		if _, err := exec.LookPath(bin); err != nil {
			testenv.SkipOrFail(t, "%s not installed: run make deps", bin)
		}
	}
	if testing.Short() {
		t.Skip("about a minute of lab traffic; skipped with -short")
	}
	rep, err := Run(context.Background(), Options{Log: testLog{t}}, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", Markdown(rep))
	for _, sc := range Scenarios {
		for _, p := range Paths {
			res := rep.Find(sc, p)
			if sc == ScenarioIdle && (p == PathDirect || p == PathDirectSame) {
				if res != nil {
					t.Errorf("%s measured on %s, which has no proxy", sc, p)
				}
				continue
			}
			if res == nil {
				t.Errorf("no result for %s on %s", sc, p)
				continue
			}
			want := map[string]string{ScenarioBulk1: "gbit_per_s", ScenarioBulk8: "gbit_per_s", ScenarioRR: "p99_us",
				ScenarioConns: "conns_per_s", ScenarioCPU: "rps", ScenarioIdle: "bytes_per_conn"}[sc]
			if v, ok := res.Median[want]; !ok || (sc != ScenarioIdle && v <= 0) {
				t.Errorf("%s on %s: %s = %v (present %v)", sc, p, want, v, ok)
			}
			if p != PathDirect && p != PathDirectSame && sc != ScenarioIdle && res.Median["proxy_cpu_s"] <= 0 && sc != ScenarioRR {
				t.Errorf("%s on %s: no proxy CPU measured", sc, p)
			}
		}
	}
	if rep.Physical.AESGCMSealBytesPerS <= 0 || rep.Physical.TLSBytesPerCPUS <= 0 || rep.Physical.VethTCPBytesPerS <= 0 {
		t.Errorf("physical context missing: %+v", rep.Physical)
	}
	if len(rep.Targets) == 0 {
		t.Error("no targets evaluated")
	}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(string(p))
	return len(p), nil
}
