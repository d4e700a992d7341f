package config

import (
	"cmp"
	"encoding/binary"
	"hash/maphash"
	"maps"
	"slices"
	"strings"
	"sync"
	"unique"
)

// Intern returns the canonical copy of s (package unique), so that the
// values a mesh repeats across its workloads and services — namespaces,
// service accounts, trust domains, networks, nodes, clusters, localities,
// hostnames — are held once, not once per workload. NewSnapshot and Apply
// intern what they index; providers may intern earlier to drop their own
// copies sooner.
//
// The canonical copy lives while a handle to it does; snapshots keep the
// strings, not handles, so after a garbage collection in which no handle
// survived, the next Intern of a value makes a new canonical copy. Sharing
// is thus per value and per GC epoch: at most one copy per distinct value
// per epoch, never one per workload.
func Intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
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
	if len(w.AuthorizationPolicies) > 0 {
		refs := make([]string, len(w.AuthorizationPolicies))
		for i, ref := range w.AuthorizationPolicies {
			refs[i] = Intern(ref)
		}
		w.AuthorizationPolicies = refs
	}
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
