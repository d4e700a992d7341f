package localfile

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/store"
)

// syncBuffer is a log sink safe for the provider goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// cfg renders a one-node file with local workloads whose netns paths live in dir.
func cfg(dir string, names ...string) string {
	var b strings.Builder
	b.WriteString("workloads:\n")
	for i, n := range names {
		fmt.Fprintf(&b, "- uid: %s\n  name: %s\n  namespace: default\n  protocol: HBONE\n  workloadIps: [198.18.1.%d]\n  node: node-a\n  netnsPath: %s\n",
			n, n, i+1, filepath.Join(dir, n))
	}
	return b.String()
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	// Write then rename, as editors and ConfigMap updates do.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func touch(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func localNames(s *config.Snapshot) string {
	var out []string
	for _, w := range s.LocalWorkloads() {
		out = append(out, w.Name)
	}
	return strings.Join(out, ",")
}

func TestProviderFollowsFile(t *testing.T) {
	dir := t.TempDir()
	nsDir := filepath.Join(dir, "netns")
	if err := os.Mkdir(nsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	touch(t, filepath.Join(nsDir, "a"), filepath.Join(nsDir, "b"))
	path := filepath.Join(dir, "config.yaml")
	writeFile(t, path, cfg(nsDir, "a"))

	st := store.New("node-a")
	var logs syncBuffer
	p := New(path, st, Options{
		// Plain files stand in for network namespaces here; the nsfs check
		// itself is tested in package config.
		Config:   config.Options{Node: "node-a", CheckNetns: func(p string) error { _, err := os.Stat(p); return err }},
		Interval: 10 * time.Millisecond,
		Logger:   slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := localNames(st.Current()); got != "a" || st.Generation() != 1 {
		t.Fatalf("initial load: %q gen %d", got, st.Generation())
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("Run returned %v", err)
		}
	}()

	// A valid change applies live.
	writeFile(t, path, cfg(nsDir, "a", "b"))
	waitFor(t, "a,b applied", func() bool { return localNames(st.Current()) == "a,b" })
	gen := st.Generation()

	// An invalid file is rejected with a precise error; the previous snapshot stays.
	writeFile(t, path, cfg(nsDir, "a", "b")+"  servicAccount: x\n")
	waitFor(t, "rejection", func() bool { return p.LastError() != nil })
	if err := p.LastError(); !strings.Contains(err.Error(), "workloads[1].servicAccount: unknown field") {
		t.Errorf("LastError = %v", err)
	}
	if st.Generation() != gen || localNames(st.Current()) != "a,b" {
		t.Errorf("rejected file changed the store: gen %d %q", st.Generation(), localNames(st.Current()))
	}
	waitFor(t, "rejection logged", func() bool { return strings.Contains(logs.String(), "configuration rejected") })
	time.Sleep(50 * time.Millisecond) // several polls of the same broken file
	if n := strings.Count(logs.String(), "configuration rejected"); n != 1 {
		t.Errorf("same rejection logged %d times", n)
	}
	if s := p.Status(); s.Rejections != 1 || !s.Loaded || s.LastError == "" || s.Generation != gen {
		t.Errorf("status = %+v", s)
	}

	// Back to the version in force: error clears, nothing republished.
	writeFile(t, path, cfg(nsDir, "a", "b"))
	waitFor(t, "error cleared", func() bool { return p.LastError() == nil })
	if st.Generation() != gen {
		t.Errorf("identical content republished: gen %d, want %d", st.Generation(), gen)
	}

	// A workload whose netns does not exist is rejected, naming it; once the
	// netns appears the same file applies without being touched.
	writeFile(t, path, cfg(nsDir, "a", "b", "c"))
	waitFor(t, "missing netns rejected", func() bool { return p.LastError() != nil })
	if err := p.LastError(); !strings.Contains(err.Error(), `workloads[2] (uid "c"): netnsPath: network namespace of workload c is not usable`) {
		t.Errorf("LastError = %v", err)
	}
	touch(t, filepath.Join(nsDir, "c"))
	waitFor(t, "c applied after its netns appeared", func() bool { return localNames(st.Current()) == "a,b,c" })
	if p.LastError() != nil {
		t.Errorf("LastError after recovery = %v", p.LastError())
	}

	// The file disappearing keeps the configuration in force.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "missing file reported", func() bool { return p.LastError() != nil })
	if localNames(st.Current()) != "a,b,c" {
		t.Errorf("store changed after the file vanished: %q", localNames(st.Current()))
	}
}

func TestProviderReloadErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	st := store.New("node-a")
	p := New(path, st, Options{Config: config.Options{Node: "node-a"}, Logger: slog.New(slog.DiscardHandler)})
	if err := p.Reload(); err == nil || !strings.Contains(err.Error(), "stat config") {
		t.Fatalf("missing file: %v", err)
	}
	writeFile(t, path, "workloads: [\n")
	if err := p.Reload(); err == nil || !strings.Contains(err.Error(), "load config "+path) {
		t.Fatalf("malformed file: %v", err)
	}
	if st.Generation() != 0 {
		t.Errorf("rejected file published")
	}
	select {
	case <-st.Loaded():
		t.Error("store loaded from a rejected file")
	default:
	}
	writeFile(t, path, "")
	if err := p.Reload(); err != nil || st.Generation() != 1 {
		t.Fatalf("empty file: %v gen %d", err, st.Generation())
	}
	// Same content again (even forced): no new generation.
	if err := p.Reload(); err != nil || st.Generation() != 1 {
		t.Fatalf("unchanged reload: %v gen %d", err, st.Generation())
	}
}
