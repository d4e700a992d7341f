package lab

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// AppPackage is the import path of the lab's test application.
const AppPackage = "github.com/warren-mesh/warren/tests/cmd/labapp"

// BuildApp compiles the lab's test application (tests/cmd/labapp) into dir
// and returns the binary's path. It needs the Go toolchain and must run
// inside the module, as tests do.
func BuildApp(dir string) (string, error) {
	return BuildCommand(dir, AppPackage)
}

// BuildCommand compiles the main package pkg into dir and returns the binary's path.
func BuildCommand(dir, pkg string) (string, error) {
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("lab: go build %s: %w\n%s", pkg, err, b)
	}
	return out, nil
}

// WaitOutput waits until the process has printed substr, and fails if it
// exits first or timeout passes.
func (p *Process) WaitOutput(substr string, timeout time.Duration) error {
	deadline := time.After(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if strings.Contains(p.Output(), substr) {
			return nil
		}
		select {
		case <-p.done:
			if strings.Contains(p.Output(), substr) {
				return nil
			}
			return fmt.Errorf("lab: %s exited before printing %q: %v\n%s", p.where, substr, p.err, p.Output())
		case <-deadline:
			return fmt.Errorf("lab: %s did not print %q within %s:\n%s", p.where, substr, timeout, p.Output())
		case <-tick.C:
		}
	}
}
