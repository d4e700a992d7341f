package config

import (
	"cmp"
	"encoding/binary"
	"hash/maphash"
	"maps"
	"slices"
	"strings"
	"sync"
)

// Intern returns the canonical copy of s, so that the values a mesh
// repeats across its workloads and services — namespaces, service
// accounts, trust domains, networks, nodes, clusters, localities,
// hostnames, policy keys — are held once, not once per workload.
// NewSnapshot and Apply intern what they index; providers may intern
// earlier to drop their own copies sooner.
//
// The table keeps its copies until it holds internLimit of them, then
// starts afresh (strings handed out stay valid; values seen again get a
// new copy), so values that churn away cannot grow it without bound. It
// replaced package unique, whose copies die with their last handle:
// snapshots keep strings, not handles, so every collection made the next
// Intern of a value allocate it again, and at 100,000 workloads under
// churn those small copies, scattered among garbage, held 5–10 MiB of
// otherwise empty heap pages (BENCHMARKS.md, Scale).
func Intern(s string) string {
	if s == "" {
		return ""
	}
	return lookupOrAdd(&interned.m, s, func() (string, string) {
		c := strings.Clone(s) // the key too: s may point into a provider's buffer
		return c, c
	})
}

// lookupOrAdd returns (*m)[k]; when absent it adds the entry add returns,
// starting the tables afresh first if they hold internLimit values.
func lookupOrAdd[V any](m *map[string]V, k string, add func() (string, V)) V {
	interned.mu.RLock()
	v, ok := (*m)[k]
	interned.mu.RUnlock()
	if ok {
		return v
	}
	interned.mu.Lock()
	defer interned.mu.Unlock()
	if v, ok := (*m)[k]; ok {
		return v
	}
	if interned.m == nil || len(interned.m) >= internLimit {
		interned.m = make(map[string]string)
		interned.lists = make(map[string][]string)
	}
	key, v := add()
	(*m)[key] = v
	return v
}

// internLimit bounds the intern table: far more distinct values than a
// mesh of 100,000 workloads has (about 30,000).
const internLimit = 1 << 18

var interned struct {
	mu sync.RWMutex
	m  map[string]string
	// lists holds the shared one-key lists of internList.
	lists map[string][]string
}

// internList returns refs with its strings interned; a one-key list (the
// common case: a workload selected by one policy) is shared by every
// workload with that key instead of being allocated for each.
func internList(refs []string) []string {
	if len(refs) == 0 {
		return refs
	}
	if len(refs) > 1 {
		out := make([]string, len(refs))
		for i, r := range refs {
			out[i] = Intern(r)
		}
		return out
	}
	k := Intern(refs[0])
	return lookupOrAdd(&interned.lists, k, func() (string, []string) { return k, []string{k} })
}

// internWorkload interns w's repeated strings in place, and makes its name
// a slice of its UID when the UID ends in "/<name>" (ztunnel's and istiod's
// "cluster//v1/Pod/ns/name"): one string per workload instead of two. Its
// WorkloadMeta is interned already (SetMeta).
//
// What stays per workload (UID, name, addresses, policy list) is copied,
// next to the Workload copy, so that nothing of the provider's decoded
// input outlives it: a string kept from a decoded message pins a slot in
// a span whose other slots held that message's garbage, and at 100,000
// workloads those holes were 20–30 MiB of resident memory
// (BENCHMARKS.md, Scale).
func internWorkload(w *Workload) {
	w.UID = strings.Clone(w.UID)
	if n := len(w.Name); n > 0 && len(w.UID) > n && w.UID[len(w.UID)-n-1] == '/' && w.UID[len(w.UID)-n:] == w.Name {
		w.Name = w.UID[len(w.UID)-n:]
	} else {
		w.Name = strings.Clone(w.Name)
	}
	w.WorkloadIPs = slices.Clip(slices.Clone(w.WorkloadIPs))
	w.AuthorizationPolicies = internList(w.AuthorizationPolicies)
	w.Namespace = Intern(w.Namespace)
	w.TrustDomain = Intern(w.TrustDomain)
	w.ServiceAccount = Intern(w.ServiceAccount)
	w.Network = Intern(w.Network)
	w.Node = Intern(w.Node)
}

// serviceMaps shares identical Workload.Services maps between the
// workloads of a line of snapshots (one NewSnapshot and the Applies derived
// from it): a Deployment's replicas back the same services with the same
// ports, so a mesh holds about one map per service, not one per workload
// (a one-entry map is about 400 bytes). Snapshots never modify a map; the
// canonical copy is made once, with interned keys.
type serviceMaps struct {
	mu sync.Mutex
	// m holds the canonical maps by the hash of their content (the
	// content itself, as a string key, was 2 MiB more at 20,000 services).
	m map[uint64][]map[NamespacedHostname]PortMap
	n int
}

// canonical returns the shared map equal to m (nil and empty stay as they
// are). limit bounds the table: past it (services renamed or re-ported
// over time), the table starts afresh, so it never holds more than limit
// stale maps.
func (t *serviceMaps) canonical(m map[NamespacedHostname]PortMap, limit int) map[NamespacedHostname]PortMap {
	if len(m) == 0 {
		return m
	}
	h := maphash.Bytes(seed, serviceMapKey(m))
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.m[h] {
		if sameServices(c, m) {
			return c
		}
	}
	if t.m == nil || t.n >= limit {
		t.m, t.n = make(map[uint64][]map[NamespacedHostname]PortMap), 0
	}
	c := make(map[NamespacedHostname]PortMap, len(m))
	for k, ports := range m {
		c[NamespacedHostname{Namespace: Intern(k.Namespace), Hostname: Intern(k.Hostname)}] = maps.Clone(ports) // nil stays nil
	}
	t.m[h] = append(t.m[h], c)
	t.n++
	return c
}

// sameServices reports whether a and b are equal as reflect.DeepEqual
// sees them (a nil port map differs from an empty one).
func sameServices(a, b map[NamespacedHostname]PortMap) bool {
	return maps.EqualFunc(a, b, func(x, y PortMap) bool {
		return (x == nil) == (y == nil) && maps.Equal(x, y)
	})
}

// serviceMapKey is equal for equal maps: the sorted entries.
func serviceMapKey(m map[NamespacedHostname]PortMap) []byte {
	var b []byte
	appendEntry := func(k NamespacedHostname, ports PortMap) {
		b = append(b, k.Namespace...)
		b = append(b, 0)
		b = append(b, k.Hostname...)
		b = append(b, 0)
		for _, sp := range slices.Sorted(maps.Keys(ports)) {
			b = binary.BigEndian.AppendUint16(b, sp)
			b = binary.BigEndian.AppendUint16(b, ports[sp])
		}
		if ports == nil {
			b = append(b, 'n') // nil and empty port maps differ for reflect.DeepEqual
		}
		b = append(b, 1)
	}
	if len(m) == 1 {
		for k, ports := range m {
			appendEntry(k, ports)
		}
		return b
	}
	keys := slices.SortedFunc(maps.Keys(m), func(x, y NamespacedHostname) int {
		return cmp.Or(cmp.Compare(x.Namespace, y.Namespace), cmp.Compare(x.Hostname, y.Hostname))
	})
	for _, k := range keys {
		appendEntry(k, m[k])
	}
	return b
}
