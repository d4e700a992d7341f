// Package testenv decides whether privileged tests run, skip, or fail.
//
// A privileged test (root, BPF, network namespaces) skips on a machine that
// cannot run it, unless WARREN_REQUIRE_PRIVILEGED=1 is set, as CI does: then a
// skip would hide a missing feature, so it fails instead.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// RequirePrivilegedEnv names the variable that turns privileged skips into failures.
const RequirePrivilegedEnv = "WARREN_REQUIRE_PRIVILEGED"

// Required reports whether privileged tests must run.
func Required() bool { return os.Getenv(RequirePrivilegedEnv) == "1" }

// SkipOrFail skips the test with the reason, or fails it when privileged tests are required.
func SkipOrFail(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if Required() {
		tb.Fatalf("%s (%s=1: privileged tests must run)", msg, RequirePrivilegedEnv)
	}
	tb.Skip(msg)
}

// RequireRoot skips or fails the test unless it runs as root.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(tb, "needs root (run make test, which uses sudo for privileged tests)")
	}
}
