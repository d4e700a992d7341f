package config

import (
	"hash/maphash"
	"maps"
	"reflect"
)

// shardBits sets the number of shards of a shardMap: 256. A change copies
// one shard, about n/256 entries: about 400 entries (~15 µs) for the byIP
// index of a 100,000-workload mesh, while an empty map costs 256 nil
// pointers (2 KiB) per index.
const shardBits = 8

const nShards = 1 << shardBits

// seed is fixed per process: snapshots derived from one another must put
// a key in the same shard.
var seed = maphash.MakeSeed()

// shardMap is a persistent (copy-on-write) hash map: a root array of shard
// maps, shared between snapshots. A writer derives a new version with
// clone, which copies only the root (2 KiB); the first write to a shard in
// that version copies that shard. Versions never change once published, so
// readers need no lock. The zero value is an empty map.
type shardMap[K comparable, V any] struct {
	root *[nShards]map[K]V
	// owned marks the shards this (unpublished) version has copied and may
	// write in place; nil once frozen.
	owned *[nShards]bool
	n     int
}

func shardOf[K comparable](k K) int {
	return int(maphash.Comparable(seed, k) & (nShards - 1))
}

// get returns the value at k.
func (m *shardMap[K, V]) get(k K) (V, bool) {
	if m.root == nil {
		var zero V
		return zero, false
	}
	v, ok := m.root[shardOf(k)][k]
	return v, ok
}

// len returns the number of entries.
func (m *shardMap[K, V]) len() int { return m.n }

// clone returns a writable version sharing every shard with m.
func (m *shardMap[K, V]) clone() shardMap[K, V] {
	c := shardMap[K, V]{root: new([nShards]map[K]V), owned: new([nShards]bool), n: m.n}
	if m.root != nil {
		*c.root = *m.root
	}
	return c
}

// writable returns shard i, copied first unless this version owns it.
func (m *shardMap[K, V]) writable(i int) map[K]V {
	if m.owned == nil {
		panic("config: write to a frozen shardMap")
	}
	if !m.owned[i] {
		m.root[i] = maps.Clone(m.root[i])
		if m.root[i] == nil {
			m.root[i] = make(map[K]V)
		}
		m.owned[i] = true
	}
	return m.root[i]
}

// set stores v at k.
func (m *shardMap[K, V]) set(k K, v V) {
	s := m.writable(shardOf(k))
	if _, ok := s[k]; !ok {
		m.n++
	}
	s[k] = v
}

// del removes k.
func (m *shardMap[K, V]) del(k K) {
	i := shardOf(k)
	if m.root == nil || m.root[i] == nil {
		return
	}
	if _, ok := m.root[i][k]; !ok {
		return
	}
	delete(m.writable(i), k)
	m.n--
}

// freeze ends writes: the version may now be shared.
func (m *shardMap[K, V]) freeze() { m.owned = nil }

// all calls fn for every entry, in no particular order, until fn returns false.
func (m *shardMap[K, V]) all(fn func(K, V) bool) {
	if m.root == nil {
		return
	}
	for _, s := range m.root {
		for k, v := range s {
			if !fn(k, v) {
				return
			}
		}
	}
}

// diff calls fn for every key whose value differs between a and b by
// changed (absent on one side: the zero value and false). Shards the two
// versions share are skipped without being read, so two versions derived
// from one another compare in O(shards + entries of the shards that differ).
func diffShards[K comparable, V any](a, b *shardMap[K, V], changed func(x, y V) bool, fn func(k K, old V, oldOK bool, new V, newOK bool)) {
	var empty [nShards]map[K]V
	ra, rb := a.root, b.root
	if ra == nil {
		ra = &empty
	}
	if rb == nil {
		rb = &empty
	}
	if ra == rb {
		return
	}
	for i := range nShards {
		sa, sb := ra[i], rb[i]
		if sameMap(sa, sb) {
			continue
		}
		for k, x := range sa {
			y, ok := sb[k]
			if !ok || changed(x, y) {
				fn(k, x, true, y, ok)
			}
		}
		for k, y := range sb {
			if _, ok := sa[k]; !ok {
				var zero V
				fn(k, zero, false, y, true)
			}
		}
	}
}

// sameMap reports whether a and b are the same map (not merely equal):
// the same runtime map, as shared by versions derived from one another.
func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}
