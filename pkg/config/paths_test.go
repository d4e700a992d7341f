package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warren-mesh/warren/internal/cgroup2"
)

func TestCheckNetnsPath(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-netns")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path string
		want string // "" for no error
	}{
		{"/proc/self/ns/net", ""},
		{file, "is not a namespace file"},
		{"/run/netns/warren-test-does-not-exist", "no such file or directory"},
	}
	for _, tc := range cases {
		err := CheckNetnsPath(tc.path)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("CheckNetnsPath(%s) = %v, want %q", tc.path, err, tc.want)
		}
	}
}

func TestCheckCgroupPath(t *testing.T) {
	root, err := cgroup2.Mount()
	if err != nil {
		t.Skipf("no cgroup2 mount: %v", err)
	}
	if err := CheckCgroupPath(root); err != nil {
		t.Errorf("cgroup2 root %s: %v", root, err)
	}
	if err := CheckCgroupPath(t.TempDir()); err == nil || !strings.Contains(err.Error(), "not in a cgroup v2 hierarchy") {
		t.Errorf("temp dir: %v", err)
	}
}

func TestSnapshotChecksRealNetns(t *testing.T) {
	c := Config{Workloads: []*Workload{
		{UID: "ok", Name: "ok", Namespace: "n", Node: "me", Protocol: ProtocolHBONE, WorkloadIPs: addrs("198.18.1.1"), Paths: &LocalPaths{NetnsPath: "/proc/self/ns/net"}},
		{UID: "bad", Name: "bad", Namespace: "n", Node: "me", Protocol: ProtocolHBONE, WorkloadIPs: addrs("198.18.1.2"), Paths: &LocalPaths{NetnsPath: "/proc/self/ns/nope"}},
	}}
	_, err := NewSnapshot(c, Options{Node: "me"})
	if err == nil || !strings.Contains(err.Error(), `workloads[1] (uid "bad"): netnsPath: network namespace of workload bad is not usable`) ||
		strings.Contains(err.Error(), `uid "ok"`) {
		t.Fatalf("err = %v", err)
	}
}
