package loader

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

func TestProbeAllNamesMissingFeature(t *testing.T) {
	fs := []feature{
		{"present", "4.0", func() error { return nil }},
		{"bpf_frobnicate in sockops", "9.9", func() error { return ebpf.ErrNotSupported }},
		{"other", "9.8", func() error { return errors.New("probe broke") }},
	}
	err := probeAll(fs)
	if !errors.Is(err, ErrMissingFeature) {
		t.Fatalf("err = %v, want ErrMissingFeature", err)
	}
	for _, want := range []string{"bpf_frobnicate in sockops", "Linux 9.9", "probe other: probe broke"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "present") {
		t.Errorf("error %q names a present feature", err)
	}
}

func TestProbeThisKernel(t *testing.T) {
	if err := Probe(); err != nil {
		t.Fatalf("this kernel (the CI floor) lacks: %v", err)
	}
	for _, f := range requiredFeatures() {
		if versionLess([2]int{5, 15}, parseVersion(t, f.since)) {
			t.Errorf("%s needs %s, above the documented floor 5.15", f.name, f.since)
		}
	}
}

func parseVersion(t *testing.T, s string) [2]int {
	var v [2]int
	maj, min, ok := strings.Cut(s, ".")
	a, err1 := strconv.Atoi(maj)
	b, err2 := strconv.Atoi(min)
	if !ok || err1 != nil || err2 != nil {
		t.Fatalf("bad version %q", s)
	}
	v[0], v[1] = a, b
	return v
}

func versionLess(a, b [2]int) bool { return a[0] < b[0] || a[0] == b[0] && a[1] < b[1] }
