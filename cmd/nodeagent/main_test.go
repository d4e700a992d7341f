package main

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestEnvSetsFlagsCommandLineWins(t *testing.T) {
	cmd := newRunCmd()
	t.Setenv("WARREN_TRUST_DOMAIN", "example.org")
	t.Setenv("WARREN_LOG_LEVEL", "debug")
	if err := cmd.Flags().Parse([]string{"--log-level", "warn"}); err != nil {
		t.Fatal(err)
	}
	if err := applyEnv(cmd.Flags()); err != nil {
		t.Fatal(err)
	}
	if got, _ := cmd.Flags().GetString("trust-domain"); got != "example.org" {
		t.Errorf("trust-domain = %q, want the environment's example.org", got)
	}
	if got, _ := cmd.Flags().GetString("log-level"); got != "warn" {
		t.Errorf("log-level = %q, want the command line's warn", got)
	}
	t.Setenv("WARREN_DRAIN_TIMEOUT", "soon")
	if err := applyEnv(cmd.Flags()); err == nil || !strings.Contains(err.Error(), "WARREN_DRAIN_TIMEOUT") {
		t.Errorf("bad environment value: err = %v, want one naming the variable", err)
	}
}

func TestRunRejectsBadSettings(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--node", "n"}, "--config is required"},
		{[]string{"--provider", "etcd", "--node", "n"}, `--provider "etcd"`},
		{[]string{"--config", "x.yaml", "--node", "n", "--trust-domain", "Bad Domain"}, "--trust-domain"},
		{[]string{"--config", "x.yaml", "--node", "n", "--exclude-cidrs", "10.0.0.0/33"}, "--exclude-cidrs"},
		{[]string{"--config", "x.yaml", "--node", "n", "--log-level", "loud"}, "--log-level"},
		{[]string{"--config", "x.yaml", "--node", "n", "--ca-provider", "vault"}, `--ca-provider "vault": want one of builtin, spire, istiod, warren`},
		{[]string{"--config", "x.yaml", "--node", "n", "--spire-admin-socket", "/s"}, "--ca-provider=builtin ignores --spire-admin-socket"},
		{[]string{"--config", "x.yaml", "--node", "n", "--ca-provider", "spire"}, "--ca-provider=spire needs --spire-admin-socket"},
	} {
		cmd := newRunCmd()
		cmd.SetArgs(tc.args)
		cmd.SetOut(&bytes.Buffer{})
		cmd.SetErr(&bytes.Buffer{})
		err := cmd.Execute()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("run %v: err = %v, want one containing %q", tc.args, err, tc.want)
		}
	}
}

func TestDoctorSaysHowToFix(t *testing.T) {
	var out bytes.Buffer
	err := runChecks(&out, []check{
		{"fine", func() (string, error) { return "yes", nil }, "nothing"},
		{"broken", func() (string, error) { return "", errors.New("no bpffs") }, "mount -t bpf bpf /sys/fs/bpf"},
	})
	if err == nil || !strings.Contains(err.Error(), "1 of 2") {
		t.Fatalf("err = %v, want 1 of 2 checks failed", err)
	}
	for _, want := range []string{"ok    fine", "FAIL  broken", "no bpffs", "fix: mount -t bpf bpf /sys/fs/bpf"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("doctor output lacks %q:\n%s", want, out.String())
		}
	}
}

// Doctor's list starts with the ip netns exec check run makes at start: the
// same function, so the two cannot disagree.
func TestDoctorChecksIPNetnsExecFirst(t *testing.T) {
	checks := doctorChecks("/sys/fs/bpf/warren", nil)
	if checks[0].name != "not under ip netns exec" ||
		reflect.ValueOf(checks[0].run).Pointer() != reflect.ValueOf(checkNotIPNetnsExec).Pointer() {
		t.Fatalf("first doctor check is %q, want the ip netns exec check", checks[0].name)
	}
}

func TestPrintCerts(t *testing.T) {
	body := `[
	{"identity":"spiffe://cluster.local/ns/default/sa/web","provider":"spire","pods":2,"state":"valid","serial":"1a2b","notBefore":"2026-12-01T10:00:00Z","notAfter":"2026-12-01T11:00:00Z","nextRefresh":"2026-12-01T10:30:00Z"},
	{"identity":"spiffe://cluster.local/ns/prod/sa/db","provider":"spire","pods":1,"state":"unavailable","lastError":"fetch spiffe://cluster.local/ns/prod/sa/db from spire: no SVID for selectors [k8s:ns:prod k8s:sa:db]","nextRefresh":"2026-12-01T10:00:04Z"},
	{"identity":"spiffe://cluster.local/ns/prod/sa/new","provider":"spire","pods":1,"state":"pending"}]`
	var out bytes.Buffer
	if err := printCerts(&out, []byte(body)); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("%d lines, want a header and 3 rows:\n%s", len(lines), out.String())
	}
	for i, want := range [][]string{
		{"IDENTITY", "PROVIDER", "STATE", "LAST ERROR"},
		{"spiffe://cluster.local/ns/default/sa/web", "spire", "valid", "1a2b", "2026-12-01T11:00:00Z", "2026-12-01T10:30:00Z"},
		{"spiffe://cluster.local/ns/prod/sa/db", "spire", "unavailable", "no SVID for selectors [k8s:ns:prod k8s:sa:db]"},
		{"spiffe://cluster.local/ns/prod/sa/new", "spire", "pending", "first fetch in progress"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("line %d lacks %q: %s", i, w, lines[i])
			}
		}
	}
	out.Reset()
	if err := printCerts(&out, []byte("[]")); err != nil || !strings.Contains(out.String(), "no certificates: no enrolled pod") {
		t.Errorf("empty view: %q, %v", out.String(), err)
	}
	if err := printCerts(&out, []byte("{")); err == nil {
		t.Error("garbled body accepted")
	}
}

func TestPrintWorkloads(t *testing.T) {
	var out bytes.Buffer
	body := `[{"name":"a","namespace":"default","identity":"spiffe://cluster.local/ns/default/sa/a","ips":["198.19.1.11"],"netns":"/run/netns/a","netnsCookie":42,"serving":true,"openInboundConnections":3},
	{"name":"b","namespace":"default","identity":"spiffe://cluster.local/ns/default/sa/b","serving":false,"error":"certificate: CA unreachable"}]`
	if err := printWorkloads(&out, []byte(body)); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"enrolled (netns cookie 42)", "NOT SERVING: certificate: CA unreachable", "198.19.1.11"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
