package identity

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Manager invariants:
//
//   - One entry per Identity that at least one pod on this node holds
//     (Acquire/Release count the pods). The entry goes away with the last pod:
//     its timer is stopped and any fetch in flight is cancelled and discarded.
//   - At most one fetch per entry is in flight. Concurrent Acquire calls and
//     handshakes for one identity wait for that fetch instead of starting their
//     own, so a burst of pods of one service account costs one CA request.
//   - After a good fetch the next one is scheduled at the certificate's
//     half-life; after a failed one after a back-off doubling from MinBackoff
//     to MaxBackoff. A fetch that returns a certificate already past its
//     half-life (a CA that has not rotated yet) also backs off, so the
//     Manager never spins.
//   - The certificate in use is swapped atomically. TLS reads it in
//     GetCertificate/GetClientCertificate, so rotation affects only handshakes
//     that start afterwards; established connections keep the certificate
//     they were made with.
//   - An old certificate keeps being served while renewals fail, until it expires.

// Default back-off bounds and fetch timeout.
const (
	DefaultMinBackoff   = 500 * time.Millisecond
	DefaultMaxBackoff   = 150 * time.Second
	DefaultFetchTimeout = 30 * time.Second
)

// Options configure a Manager. Provider is required.
type Options struct {
	// Provider issues the certificates.
	Provider Provider
	// ProviderName names the provider in metrics, the inspect view (CertInfo),
	// readiness and errors: the node agent passes its --ca-provider value,
	// "builtin", "spire" or "istiod". Default "unknown".
	ProviderName string
	// Bundles, when set, is where peers' chains are verified, instead of the
	// bundles the Provider returned with each certificate. Providers whose trust
	// bundle changes between fetches (SPIRE) offer one.
	Bundles x509bundle.Source
	// Clock defaults to the system clock.
	Clock Clock
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Registry, when set, receives the Manager's metrics.
	Registry prometheus.Registerer
	// MinBackoff and MaxBackoff bound the retry delay after failed fetches
	// (defaults DefaultMinBackoff and DefaultMaxBackoff).
	MinBackoff, MaxBackoff time.Duration
	// FetchTimeout bounds one fetch (default DefaultFetchTimeout).
	FetchTimeout time.Duration
}

// Manager holds one X.509-SVID per identity of the pods on this node.
// Its methods are safe for concurrent use.
type Manager struct {
	provider     Provider
	providerName string
	clock        Clock
	log          *slog.Logger
	minBackoff   time.Duration
	maxBackoff   time.Duration
	fetchTimeout time.Duration
	peerBundles  x509bundle.Source
	bundles      *x509bundle.Set // as returned by fetches
	fetchErrors  prometheus.Counter

	ctx    context.Context // parent of every fetch; cancelled by Close
	cancel context.CancelFunc

	mu      sync.Mutex
	entries map[Identity]*entry
	closed  bool
}

type entry struct {
	id  Identity
	cur atomic.Pointer[held] // certificate in use; nil until the first good fetch

	// Guarded by Manager.mu.
	refs        int
	fetching    bool
	cancelFetch context.CancelFunc
	timer       Timer
	failures    int       // consecutive failed or stale fetches
	lastErr     error     // of the last fetch; nil after a good one
	nextFetch   time.Time // when the timer fires
	done        chan struct{}
	removed     bool
}

// held is one certificate ready for TLS.
type held struct {
	svid    *x509svid.SVID
	cert    *tls.Certificate
	renewAt time.Time
}

func (h *held) leafValid(now time.Time) bool {
	return h != nil && !now.Before(h.cert.Leaf.NotBefore) && now.Before(h.cert.Leaf.NotAfter)
}

// NewManager returns a Manager that fetches from opts.Provider.
// Call Close to stop its timers.
func NewManager(opts Options) (*Manager, error) {
	if opts.Provider == nil {
		return nil, errors.New("new identity manager: no provider")
	}
	m := &Manager{
		provider:     opts.Provider,
		providerName: opts.ProviderName,
		clock:        opts.Clock,
		log:          opts.Logger,
		minBackoff:   opts.MinBackoff,
		maxBackoff:   opts.MaxBackoff,
		fetchTimeout: opts.FetchTimeout,
		peerBundles:  opts.Bundles,
		bundles:      x509bundle.NewSet(),
		entries:      make(map[Identity]*entry),
	}
	if m.providerName == "" {
		m.providerName = "unknown"
	}
	if m.clock == nil {
		m.clock = realClock{}
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	m.log = m.log.With("component", "identity", "provider", m.providerName)
	if m.minBackoff <= 0 {
		m.minBackoff = DefaultMinBackoff
	}
	if m.maxBackoff <= 0 {
		m.maxBackoff = DefaultMaxBackoff
	}
	if m.maxBackoff < m.minBackoff {
		return nil, fmt.Errorf("new identity manager: max back-off %s below min back-off %s", m.maxBackoff, m.minBackoff)
	}
	if m.fetchTimeout <= 0 {
		m.fetchTimeout = DefaultFetchTimeout
	}
	if m.peerBundles == nil {
		m.peerBundles = m.bundles
	}
	fetchErrors, err := registerMetrics(opts.Registry, m)
	if err != nil {
		return nil, fmt.Errorf("new identity manager: %w", err)
	}
	m.fetchErrors = fetchErrors
	m.ctx, m.cancel = context.WithCancel(context.Background())
	return m, nil
}

// Close stops every timer and cancels fetches in flight. Certificates already
// held keep serving handshakes; Acquire fails afterwards.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	m.cancel()
	for _, e := range m.entries {
		if e.timer != nil {
			e.timer.Stop()
		}
		if !e.fetching { // a fetch in flight wakes its waiters when it returns
			close(e.done)
			e.done = make(chan struct{})
		}
	}
	return nil
}

// Acquire records one more pod with identity id. The first Acquire of an
// identity starts a fetch; Acquire returns once a certificate is held (at
// once if it already is), or with the error of the fetch attempt it waited
// for, or when ctx ends.
//
// The pod is counted whatever Acquire returns (unless id is invalid or the
// Manager is closed): the Manager keeps retrying in the background, and the
// caller must call Release when the pod leaves.
func (m *Manager) Acquire(ctx context.Context, id Identity) error {
	if err := id.Validate(); err != nil {
		return fmt.Errorf("acquire: %w", err)
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return fmt.Errorf("acquire %s: identity manager closed", id)
	}
	e := m.entries[id]
	if e == nil {
		e = &entry{id: id, done: make(chan struct{})}
		m.entries[id] = e
		m.log.Info("identity added", "identity", id)
		m.startFetchLocked(e)
	}
	e.refs++
	if e.cur.Load().leafValid(m.clock.Now()) {
		m.mu.Unlock()
		return nil
	}
	done := e.done
	m.mu.Unlock()

	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("acquire %s (provider %s): %w", id, m.providerName, context.Cause(ctx))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case e.cur.Load().leafValid(m.clock.Now()):
		return nil
	case e.removed:
		return fmt.Errorf("acquire %s: released while fetching", id)
	case m.closed:
		return fmt.Errorf("acquire %s: identity manager closed", id)
	case e.lastErr != nil:
		return fmt.Errorf("acquire %s (provider %s): %w", id, m.providerName, e.lastErr)
	default:
		return fmt.Errorf("acquire %s (provider %s): no valid certificate", id, m.providerName)
	}
}

// Release records that one pod with identity id left. When the last one has
// gone the certificate is dropped and no more fetches are made for it.
func (m *Manager) Release(id Identity) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		m.log.Warn("release of an identity not held", "identity", id)
		return
	}
	e.refs--
	if e.refs > 0 {
		return
	}
	e.removed = true
	delete(m.entries, id)
	if e.timer != nil {
		e.timer.Stop()
	}
	if e.cancelFetch != nil {
		e.cancelFetch()
	}
	close(e.done)
	m.log.Info("identity removed", "identity", id)
}

// startFetchLocked starts a fetch for e unless one is in flight. m.mu is held.
func (m *Manager) startFetchLocked(e *entry) {
	if e.fetching || e.removed || m.closed {
		return
	}
	if e.timer != nil {
		e.timer.Stop()
		e.timer = nil
	}
	e.fetching = true
	ctx, cancel := context.WithTimeout(m.ctx, m.fetchTimeout)
	e.cancelFetch = cancel
	go m.fetch(ctx, e)
}

func (m *Manager) fetch(ctx context.Context, e *entry) {
	svid, bundle, err := m.provider.Fetch(ctx, e.id)
	now := m.clock.Now()
	if err == nil {
		err = CheckSVID(e.id, svid, bundle, now)
		if err != nil {
			err = fmt.Errorf("%s returned an unusable certificate: %w", m.providerName, err)
		}
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	e.fetching = false
	e.cancelFetch()
	e.cancelFetch = nil
	if e.removed {
		return // Release already woke the waiters
	}
	// Wake the waiters of this attempt, and arm the next attempt's channel.
	defer func() {
		close(e.done)
		e.done = make(chan struct{})
	}()
	if m.closed {
		e.lastErr = errors.New("identity manager closed")
		return
	}

	if err != nil {
		e.failures++
		e.lastErr = err
		m.fetchErrors.Inc()
		delay := m.backoff(e.failures)
		m.scheduleLocked(e, now, delay)
		m.log.Warn("certificate fetch failed", "identity", e.id, "attempt", e.failures, "retry_in", delay, "error", err)
		return
	}

	h := newHeld(svid)
	cur := e.cur.Load()
	if cur == nil || !h.cert.Leaf.NotAfter.Before(cur.cert.Leaf.NotAfter) {
		e.cur.Store(h)
	}
	m.bundles.Add(bundle)
	if !h.renewAt.After(now) {
		// The CA handed back a certificate already due for renewal (SPIRE
		// rotates on its own schedule): keep it, ask again after a back-off.
		e.failures++
		delay := m.backoff(e.failures)
		e.lastErr = fmt.Errorf("%s returned a certificate (serial %x) already past its half-life, expiring %s",
			m.providerName, h.cert.Leaf.SerialNumber, h.cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
		m.scheduleLocked(e, now, delay)
		m.log.Info("certificate not yet rotated by the CA", "identity", e.id, "serial", fmt.Sprintf("%x", h.cert.Leaf.SerialNumber), "retry_in", delay)
		return
	}
	e.failures = 0
	e.lastErr = nil
	m.scheduleLocked(e, now, h.renewAt.Sub(now))
	m.log.Info("certificate installed", "identity", e.id, "serial", fmt.Sprintf("%x", h.cert.Leaf.SerialNumber),
		"not_after", h.cert.Leaf.NotAfter, "renew_at", h.renewAt)
}

func (m *Manager) scheduleLocked(e *entry, now time.Time, d time.Duration) {
	e.nextFetch = now.Add(d)
	e.timer = m.clock.AfterFunc(d, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.entries[e.id] == e {
			m.startFetchLocked(e)
		}
	})
}

// backoff returns the delay after the n-th consecutive failure (n ≥ 1):
// MinBackoff doubled n-1 times, at most MaxBackoff.
func (m *Manager) backoff(n int) time.Duration {
	d := m.minBackoff
	for i := 1; i < n && d < m.maxBackoff; i++ {
		d *= 2
	}
	return min(d, m.maxBackoff)
}

func newHeld(svid *x509svid.SVID) *held {
	leaf := svid.Certificates[0]
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: leaf}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return &held{
		svid:    svid,
		cert:    cert,
		renewAt: leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2),
	}
}

// certificate returns id's certificate for a handshake. While the first fetch
// is in flight it waits for it (bounded by ctx); otherwise it answers at once.
func (m *Manager) certificate(ctx context.Context, id Identity) (*tls.Certificate, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	for {
		m.mu.Lock()
		e := m.entries[id]
		if e == nil {
			m.mu.Unlock()
			return nil, fmt.Errorf("certificate for %s: identity not held (no pod on this node has it)", id)
		}
		now := m.clock.Now()
		if h := e.cur.Load(); h.leafValid(now) {
			m.mu.Unlock()
			return h.cert, nil
		}
		if !e.fetching {
			err := m.notReadyLocked(e, now)
			m.mu.Unlock()
			return nil, err
		}
		done := e.done
		m.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, fmt.Errorf("certificate for %s: waiting for fetch: %w", id, context.Cause(ctx))
		}
	}
}

// SVID returns the X.509-SVID currently held for id.
func (m *Manager) SVID(id Identity) (*x509svid.SVID, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		return nil, fmt.Errorf("svid for %s: identity not held", id)
	}
	now := m.clock.Now()
	h := e.cur.Load()
	if !h.leafValid(now) {
		return nil, m.notReadyLocked(e, now)
	}
	return h.svid, nil
}

// Bundles returns the source peers' certificates are verified against.
func (m *Manager) Bundles() x509bundle.Source { return m.peerBundles }

// notReadyLocked explains why e has no valid certificate at now, naming the
// provider that was asked.
func (m *Manager) notReadyLocked(e *entry, now time.Time) error {
	var b strings.Builder
	fmt.Fprintf(&b, "fetch %s (provider %s)", e.id, m.providerName)
	if h := e.cur.Load(); h != nil && !now.Before(h.cert.Leaf.NotAfter) {
		fmt.Fprintf(&b, ": certificate expired at %s", h.cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	switch {
	case e.lastErr != nil:
		fmt.Fprintf(&b, ": %v", e.lastErr)
	case e.fetching:
		b.WriteString(": first fetch in progress")
	}
	if !e.fetching && !e.nextFetch.IsZero() {
		fmt.Fprintf(&b, ": retrying in %s", max(e.nextFetch.Sub(now), 0).Round(time.Millisecond))
	}
	return errors.New(b.String())
}

// Ready returns nil when every identity held has a valid certificate, or an
// error naming each that has not, the provider asked, and why, e.g.
// "fetch spiffe://td/ns/a/sa/b (provider istiod): create certificate for ...: CA unreachable at 10.0.0.1:15012: ...: retrying in 4s".
func (m *Manager) Ready() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock.Now()
	var errs []error
	for _, id := range m.sortedIDsLocked() {
		e := m.entries[id]
		if !e.cur.Load().leafValid(now) {
			errs = append(errs, m.notReadyLocked(e, now))
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) sortedIDsLocked() []Identity {
	ids := make([]Identity, 0, len(m.entries))
	for id := range m.entries {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i].String() < ids[j].String() })
	return ids
}

// Certificate states in CertInfo.
const (
	StatePending     = "pending"     // first fetch in flight, nothing held yet
	StateValid       = "valid"       // a valid certificate is held
	StateRenewing    = "renewing"    // a valid certificate is held; the last renewal failed and is being retried
	StateUnavailable = "unavailable" // no valid certificate; retrying with back-off
)

// CertInfo describes one identity's certificate for the admin inspect view.
type CertInfo struct {
	// Identity is the workload identity.
	Identity Identity `json:"identity"`
	// Provider names where certificates come from (Options.ProviderName).
	Provider string `json:"provider"`
	// Pods counts the pods on this node holding the identity.
	Pods int `json:"pods"`
	// State is one of the State constants.
	State string `json:"state"`
	// Serial is the certificate's serial number in hex; empty before the first certificate.
	Serial string `json:"serial,omitempty"`
	// NotBefore and NotAfter bound the certificate's validity.
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	// NextRefresh is when the next fetch starts; zero while one is in flight.
	NextRefresh time.Time `json:"nextRefresh,omitzero"`
	// LastError is the last fetch's error; empty after a good fetch.
	LastError string `json:"lastError,omitempty"`
}

// Certificates lists every identity held, sorted by identity.
func (m *Manager) Certificates() []CertInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock.Now()
	out := make([]CertInfo, 0, len(m.entries))
	for _, id := range m.sortedIDsLocked() {
		e := m.entries[id]
		ci := CertInfo{Identity: id, Provider: m.providerName, Pods: e.refs}
		h := e.cur.Load()
		if h != nil {
			ci.Serial = fmt.Sprintf("%x", h.cert.Leaf.SerialNumber)
			ci.NotBefore = h.cert.Leaf.NotBefore.UTC()
			ci.NotAfter = h.cert.Leaf.NotAfter.UTC()
		}
		if !e.fetching {
			ci.NextRefresh = e.nextFetch.UTC()
		}
		if e.lastErr != nil {
			ci.LastError = e.lastErr.Error()
		}
		switch valid := h.leafValid(now); {
		case valid && e.lastErr == nil:
			ci.State = StateValid
		case valid:
			ci.State = StateRenewing
		case h == nil && e.lastErr == nil:
			ci.State = StatePending
		default:
			ci.State = StateUnavailable
		}
		out = append(out, ci)
	}
	return out
}
