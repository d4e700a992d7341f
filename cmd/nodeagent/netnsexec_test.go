package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/tests/lab"
)

// helperEnv makes the test binary act as the helper of
// TestIPNetnsExecOnALabNode instead of running tests.
const helperEnv = "WARREN_NODEAGENT_NETNS_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "detect":
		_, err := checkNotIPNetnsExec()
		fmt.Printf("detect: %v\n", err)
	case "run":
		// What `nodeagent run` says when started this way; it stops before
		// loading anything.
		cmd := newRunCmd()
		cmd.SetArgs([]string{"--config", "x.yaml", "--node", "n"})
		cmd.SetOut(os.Stderr)
		cmd.SetErr(os.Stderr)
		fmt.Printf("run: %v\n", cmd.Execute())
	}
	os.Exit(0)
}

func TestIPNetnsExecName(t *testing.T) {
	const host = `22 1 0:21 / /proc rw,nosuid - proc proc rw
23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw
40 23 0:33 / /sys/fs/bpf rw,nosuid shared:17 - bpf bpf rw,mode=700
`
	// What iproute2 leaves: a sysfs whose source is the namespace's name on
	// /sys, mounted over (or instead of) the host's.
	ipNetnsExec := func(name string) string {
		return host + "51 48 0:40 / /sys rw,relatime - sysfs " + name + " rw\n"
	}
	mine := map[string]bool{filepath.Join(netnsRunDir, "red"): true}
	same := func(path string) (bool, error) { return mine[path], nil }
	for _, tt := range []struct {
		name, mountinfo, want string
		same                  func(string) (bool, error)
		wantErr               string
	}{
		{name: "host", mountinfo: host},
		{name: "ip netns exec red", mountinfo: ipNetnsExec("red"), want: "red"},
		{name: "sysfs named after a namespace that is not ours", mountinfo: ipNetnsExec("blue")},
		{name: "sysfs with source none (an initramfs)", mountinfo: strings.Replace(host, "sysfs sysfs", "sysfs none", 1)},
		{name: "a later host sysfs hides it", mountinfo: ipNetnsExec("red") + "60 48 0:41 / /sys rw - sysfs sysfs rw\n"},
		{name: "a later tmpfs hides it", mountinfo: ipNetnsExec("red") + "60 48 0:41 / /sys rw - tmpfs tmpfs rw\n"},
		{name: "source with a slash is no namespace name", mountinfo: ipNetnsExec("../red")},
		{name: "no /sys at all", mountinfo: "22 1 0:21 / /proc rw - proc proc rw\n"},
		{name: "garbage lines", mountinfo: "x\n\n - \n" + ipNetnsExec("red"), want: "red"},
		{name: "stat fails", mountinfo: ipNetnsExec("red"), same: func(string) (bool, error) { return false, errors.New("permission denied") }, wantErr: "permission denied"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := same
			if tt.same != nil {
				s = tt.same
			}
			got, err := ipNetnsExecName(strings.NewReader(tt.mountinfo), s)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ipNetnsExecName = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// The error names the namespace and the fix, and doctor prints that fix.
func TestIPNetnsExecErrorSaysHowToFix(t *testing.T) {
	err := errIPNetnsExec{"red"}
	for _, want := range []string{"ip netns exec red", "/sys/fs/cgroup and /sys/fs/bpf"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if want := "nsenter --net=/var/run/netns/red nodeagent run ..."; !strings.Contains(err.Fix(), want) {
		t.Errorf("fix %q lacks %q", err.Fix(), want)
	}
	var out strings.Builder
	runChecks(&out, []check{{"not under ip netns exec", func() (string, error) { return "", fmt.Errorf("check: %w", err) }, "generic"}})
	if !strings.Contains(out.String(), "fix: start it with nsenter --net=/var/run/netns/red") || strings.Contains(out.String(), "generic") {
		t.Errorf("doctor did not print the error's own fix:\n%s", out.String())
	}
}

// TestIPNetnsExecOnALabNode runs this test binary in a lab node's network
// namespace twice: with `ip netns exec`, where the detection (shared by
// doctor and run) finds the namespace and `nodeagent run` refuses to start
// with the nsenter fix; and with nsenter --net, where nothing is found.
func TestIPNetnsExecOnALabNode(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tool := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.SkipOrFail(t, "%s not installed (make deps)", tool)
		}
	}
	l, err := lab.New(lab.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	n, err := l.AddNode("node1")
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Base(n.NetNSPath())
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	helper := func(mode string, args ...string) string {
		t.Helper()
		cmd := exec.Command(args[0], append(args[1:], self)...)
		cmd.Env = append(os.Environ(), helperEnv+"="+mode)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
		}
		return string(out)
	}

	fix := "start it with nsenter --net=/var/run/netns/" + name + " nodeagent run ..."
	if out := helper("detect", "ip", "netns", "exec", name); !strings.Contains(out, "started by `ip netns exec "+name+"`") {
		t.Errorf("under ip netns exec, detection says %q", out)
	}
	if out := helper("run", "ip", "netns", "exec", name); !strings.Contains(out, "run: started by `ip netns exec "+name+"`") || !strings.Contains(out, fix) {
		t.Errorf("under ip netns exec, nodeagent run says %q, want the cause and %q", out, fix)
	}
	if out := helper("detect", "nsenter", "--net="+n.NetNSPath()); out != "detect: <nil>\n" {
		t.Errorf("under nsenter --net, detection says %q, want nothing", out)
	}
}
