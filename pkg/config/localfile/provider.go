package localfile

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
)

// DefaultInterval is how often the file's metadata is polled.
const DefaultInterval = time.Second

// fullCheckEvery is how many polls pass between reads that ignore metadata.
const fullCheckEvery = 10

// Publisher receives each accepted snapshot; *store.Store implements it.
type Publisher interface {
	Publish(snap *config.Snapshot) uint64
}

// Options configure a Provider.
type Options struct {
	// Config says how snapshots are validated (this node's name, path checks).
	Config config.Options
	// Interval between polls; 0 means DefaultInterval.
	Interval time.Duration
	// Logger for accepted and rejected files; nil means slog.Default().
	Logger *slog.Logger
}

// Provider watches one configuration file and publishes every valid
// version of it. A rejected version leaves the last published snapshot in
// force. It is safe for concurrent use.
type Provider struct {
	path string
	pub  Publisher
	opts Options
	log  *slog.Logger

	mu          sync.Mutex
	stat        fileStat
	applied     bool
	appliedHash [sha256.Size]byte
	appliedAt   time.Time
	generation  uint64
	lastErr     error
	rejections  uint64
}

type fileStat struct {
	mtime time.Time
	size  int64
	ino   uint64
	dev   uint64
}

// New returns a provider for the file at path; call Reload once to load it,
// then Run to follow changes.
func New(path string, pub Publisher, opts Options) *Provider {
	if opts.Interval <= 0 {
		opts.Interval = DefaultInterval
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Provider{path: path, pub: pub, opts: opts, log: log.With("provider", "localfile", "path", path)}
}

// Reload reads the file now and publishes it if it is valid and differs
// from the last published version. It returns the reason a version was
// rejected (the previous snapshot stays in force), or nil.
func (p *Provider) Reload() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.poll(true)
}

// Run polls the file until ctx ends, applying changes; it returns ctx.Err().
// Rejections are logged and kept as LastError; they do not stop Run.
func (p *Provider) Run(ctx context.Context) error {
	t := time.NewTicker(p.opts.Interval)
	defer t.Stop()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			p.mu.Lock()
			// Every fullCheckEvery polls, hash the file even if its metadata
			// looks unchanged (coarse mtimes, same-size in-place edits).
			_ = p.poll(n%fullCheckEvery == 0) // logged and recorded by poll
			p.mu.Unlock()
		}
	}
}

// LastError returns why the newest version of the file is not in force, or
// nil when the file in force is the newest.
func (p *Provider) LastError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastErr
}

// Status describes the provider for the admin API.
type Status struct {
	Path string `json:"path"`
	// Loaded is true once a version has been published.
	Loaded bool `json:"loaded"`
	// SHA256 of the version in force.
	SHA256     string    `json:"sha256,omitempty"`
	AppliedAt  time.Time `json:"appliedAt,omitzero"`
	Generation uint64    `json:"generation"`
	LastError  string    `json:"lastError,omitempty"`
	// Rejections counts rejected versions; one error retried unchanged counts once.
	Rejections uint64 `json:"rejections"`
}

// Status returns the provider's state.
func (p *Provider) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Status{Path: p.path, Loaded: p.applied, AppliedAt: p.appliedAt, Generation: p.generation, Rejections: p.rejections}
	if p.applied {
		s.SHA256 = hex.EncodeToString(p.appliedHash[:])
	}
	if p.lastErr != nil {
		s.LastError = p.lastErr.Error()
	}
	return s
}

// poll checks the file; force skips the metadata shortcut. Caller holds mu.
func (p *Provider) poll(force bool) error {
	fi, err := os.Stat(p.path)
	if err != nil {
		return p.reject(fmt.Errorf("stat config %s: %w", p.path, err))
	}
	st := statOf(fi)
	// Unchanged metadata and nothing pending: nothing to do. After a
	// rejection, retry every poll: the cause may lie outside the file (a
	// network namespace that appears later).
	if !force && p.applied && p.lastErr == nil && st == p.stat {
		return nil
	}
	data, err := os.ReadFile(p.path)
	if err != nil {
		return p.reject(fmt.Errorf("read config %s: %w", p.path, err))
	}
	p.stat = st
	sum := sha256.Sum256(data)
	if p.applied && sum == p.appliedHash {
		if p.lastErr != nil {
			p.log.Info("configuration file is back to the version in force")
		}
		p.lastErr = nil
		return nil
	}
	snap, err := Parse(data, p.opts.Config)
	if err != nil {
		return p.reject(fmt.Errorf("load config %s: %w", p.path, err))
	}
	p.generation = p.pub.Publish(snap)
	p.applied, p.appliedHash, p.appliedAt, p.lastErr = true, sum, time.Now(), nil
	p.log.Info("configuration applied",
		"generation", p.generation, "sha256", hex.EncodeToString(sum[:8]),
		"workloads", snap.NumWorkloads(), "local_workloads", len(snap.LocalWorkloads()),
		"services", snap.NumServices(), "policies", len(snap.Policies()))
	return nil
}

// reject records err; it logs only when the error differs from the last one,
// so a broken file retried every second logs once.
func (p *Provider) reject(err error) error {
	if p.lastErr == nil || p.lastErr.Error() != err.Error() {
		p.rejections++
		p.log.Error("configuration rejected; the previous configuration stays in force", "error", err)
	}
	p.lastErr = err
	return err
}

func statOf(fi os.FileInfo) fileStat {
	st := fileStat{mtime: fi.ModTime(), size: fi.Size()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino, st.dev = sys.Ino, uint64(sys.Dev) //nolint:unconvert // Dev is uint64 on amd64, not everywhere
	}
	return st
}
