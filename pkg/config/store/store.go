// Package store holds the node agent's one current configuration snapshot.
//
// Invariants:
//   - One writer: providers publish whole, validated snapshots with Publish,
//     or apply deltas with Apply; nothing else changes state (ztunnel's
//     ProxyStateUpdater plays this role).
//   - Readers call Current, a single atomic load with no lock; the snapshot
//     it returns never changes, so a reader may keep it for the whole of a
//     connection setup and see one consistent view.
//   - Subscribers never miss a change and never block the writer: each
//     Subscription remembers the last snapshot it delivered, and Next returns
//     the diff from that one to the newest, so several publications that
//     happen while a subscriber is busy coalesce into one Change.
package store

import (
	"context"
	"reflect"
	"sync"
	"sync/atomic"

	"github.com/warren-mesh/warren/pkg/config"
)

// Store is the current configuration plus a change feed. The zero value is
// not usable; call New.
type Store struct {
	cur    atomic.Pointer[version]
	mu     sync.Mutex // serialises Publish and the subscriber set
	subs   map[*Subscription]struct{}
	loaded chan struct{}
}

type version struct {
	snap       *config.Snapshot
	generation uint64
}

// New returns a store holding an empty snapshot for node (generation 0,
// not yet loaded).
func New(node string) *Store {
	s := &Store{subs: map[*Subscription]struct{}{}, loaded: make(chan struct{})}
	s.cur.Store(&version{snap: config.Empty(node)})
	return s
}

// Current returns the current snapshot. It never returns nil.
func (s *Store) Current() *config.Snapshot { return s.cur.Load().snap }

// Generation returns how many snapshots have been published.
func (s *Store) Generation() uint64 { return s.cur.Load().generation }

// Loaded is closed once the first snapshot has been published (for readiness).
func (s *Store) Loaded() <-chan struct{} { return s.loaded }

// Publish makes snap current and wakes every subscriber. It returns the new
// generation. snap must not be nil.
func (s *Store) Publish(snap *config.Snapshot) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	gen := s.cur.Load().generation + 1
	s.cur.Store(&version{snap: snap, generation: gen})
	if gen == 1 {
		close(s.loaded)
	}
	for sub := range s.subs {
		select {
		case sub.wake <- struct{}{}:
		default: // already signalled; Next will read the newest snapshot
		}
	}
	return gen
}

// Apply applies d to the current snapshot (config.Snapshot.Apply), publishes
// the result and returns its generation and the items rejected. Nothing is
// published when every item was rejected or d is empty. It is Publish for an
// incremental provider: O(items), not O(mesh), and as Publish it must not
// race with another writer's Current-then-Publish.
func (s *Store) Apply(d config.Delta) (uint64, []config.Rejection) {
	if d.Len() == 0 {
		return s.Generation(), nil
	}
	next, rejected := s.Current().Apply(d)
	if len(rejected) == d.Len() {
		return s.Generation(), rejected
	}
	return s.Publish(next), rejected
}

// Subscribe returns a change feed. Its first Next reports every enrolled
// workload of the current snapshot as added (if anything was published), so
// a subscriber that starts late still sees the whole state.
func (s *Store) Subscribe() *Subscription {
	sub := &Subscription{store: s, wake: make(chan struct{}, 1)}
	sub.last = &version{snap: config.Empty(s.Current().Node())}
	s.mu.Lock()
	s.subs[sub] = struct{}{}
	if s.cur.Load().generation > 0 {
		sub.wake <- struct{}{}
	}
	s.mu.Unlock()
	return sub
}

// Subscription is one consumer's view of the change feed. It is used by one
// goroutine at a time.
type Subscription struct {
	store *Store
	wake  chan struct{}
	last  *version
}

// Next blocks until the configuration differs from the one this subscription
// last returned, then returns the difference: O(changes) between snapshots
// derived from one another by Apply (see Diff). It returns ctx.Err() when ctx ends.
func (sub *Subscription) Next(ctx context.Context) (Change, error) {
	for {
		if cur := sub.store.cur.Load(); cur.generation != sub.last.generation {
			ch := Diff(sub.last.snap, cur.snap)
			ch.Generation = cur.generation
			sub.last = cur
			return ch, nil
		}
		select {
		case <-ctx.Done():
			return Change{}, ctx.Err()
		case <-sub.wake:
		}
	}
}

// Close ends the subscription.
func (sub *Subscription) Close() {
	sub.store.mu.Lock()
	delete(sub.store.subs, sub)
	sub.store.mu.Unlock()
}

// WorkloadChange is an enrolled workload whose configuration changed.
type WorkloadChange struct {
	Old, New *config.Workload
}

// Change is the difference between two snapshots, seen from this node.
type Change struct {
	// Generation of New in the store.
	Generation uint64
	Old, New   *config.Snapshot
	// Added, Removed and Changed are enrolled workloads (local to New.Node()
	// and in the mesh; see config.Snapshot.EnrolledWorkloads), sorted by UID:
	// enroll and prefetch certificates for Added, unenroll Removed, and
	// re-enroll Changed if its netns, cgroup, identity or addresses moved
	// (WorkloadChange.Reenroll). A workload leaving the mesh (protocol TCP)
	// is Removed; one joining it is Added.
	Added   []*config.Workload
	Removed []*config.Workload
	Changed []WorkloadChange
	// PoliciesChanged is true when authorization policies, peer
	// authentications or any workload's policy references differ: open
	// connections must be re-checked.
	PoliciesChanged bool
	// ServicesChanged is true when services or endpoints may differ.
	ServicesChanged bool
}

// Empty reports whether nothing changed.
func (c *Change) Empty() bool {
	return len(c.Added)+len(c.Removed)+len(c.Changed) == 0 && !c.PoliciesChanged && !c.ServicesChanged
}

// Reenroll reports whether the change touches what enrollment or the
// workload's certificate depends on: netns, cgroup, identity or addresses.
func (w WorkloadChange) Reenroll() bool {
	o, n := w.Old, w.New
	return o.NetnsPath() != n.NetnsPath() || o.CgroupPath() != n.CgroupPath() || o.Identity() != n.Identity() ||
		!reflect.DeepEqual(o.WorkloadIPs, n.WorkloadIPs)
}

// Diff computes the change from old to new: over the index nodes the two
// snapshots do not share (config.ChangedWorkloads), so its cost follows the
// changes between snapshots derived by Apply, and the mesh's size only
// between unrelated ones. Workloads are compared by UID;
// enrolled means on new's node and in the mesh (a node rename makes every
// old enrolled workload removed).
func Diff(old, new *config.Snapshot) Change {
	ch := Change{Old: old, New: new}
	oldLocal := map[string]*config.Workload{}
	if old.Node() == new.Node() {
		for _, w := range old.EnrolledWorkloads() {
			oldLocal[w.UID] = w
		}
	} else {
		ch.Removed = append(ch.Removed, old.EnrolledWorkloads()...)
	}
	for _, w := range new.EnrolledWorkloads() {
		prev, ok := oldLocal[w.UID]
		switch {
		case !ok:
			ch.Added = append(ch.Added, w)
		case !reflect.DeepEqual(prev, w):
			ch.Changed = append(ch.Changed, WorkloadChange{Old: prev, New: w})
		}
		delete(oldLocal, w.UID)
	}
	for _, w := range old.EnrolledWorkloads() { // keep UID order
		if _, gone := oldLocal[w.UID]; gone {
			ch.Removed = append(ch.Removed, w)
		}
	}
	// What the workloads changed, from the index shards the snapshots do
	// not share: O(changed) for snapshots derived by Apply.
	workloadsChanged, policyInputsChanged := false, false
	config.ChangedWorkloads(old, new, func(x, y *config.Workload) {
		workloadsChanged = true
		if x == nil || y == nil || x.Namespace != y.Namespace || x.MTLSMode != y.MTLSMode ||
			!reflect.DeepEqual(x.AuthorizationPolicies, y.AuthorizationPolicies) || !reflect.DeepEqual(x.WorkloadIPs, y.WorkloadIPs) {
			policyInputsChanged = true
		}
	})
	ch.PoliciesChanged = !config.SamePolicies(old, new) || policyInputsChanged
	ch.ServicesChanged = !config.SameServices(old, new) || workloadsChanged
	return ch
}
