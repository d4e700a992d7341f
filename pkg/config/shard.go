package config

import (
	"encoding/binary"
	"hash/maphash"
	"maps"
	"reflect"
	"sync/atomic"
)

// A shardMap is a two-level trie of 64 × 64 leaf maps, the key's hash
// choosing the path. A change copies the root (64 pointers), one middle
// node (64 leaves) and one leaf map: about 1.5 KiB plus n/4096 entries
// (about 40 for the byIP index of a 100,000-workload mesh), whatever the
// size of the map, where a flat copy-on-write map would copy all of it.
const (
	fanBits = 6
	fan     = 1 << fanBits
)

// seed is fixed per process: versions derived from one another must put a
// key in the same leaf.
var seed = maphash.MakeSeed()

// versions numbers the writable versions of every shardMap; 0 is frozen.
var versions atomic.Uint64

// shardMap is a persistent (copy-on-write) hash map. A writer derives a new
// version with clone, which copies nothing; the first write to a node in
// that version copies the path to it. Published versions never change, so
// readers need no lock. The zero value is an empty, frozen map.
type shardMap[K comparable, V any] struct {
	root *smRoot[K, V]
	// ver marks the nodes this (unpublished) version created and may write
	// in place; 0 once frozen.
	ver uint64
	n   int
}

type smRoot[K comparable, V any] struct {
	ver  uint64
	mids [fan]*smMid[K, V]
}

type smMid[K comparable, V any] struct {
	ver     uint64
	leafVer [fan]uint64
	leaves  [fan]map[K]V
}

// fmix64 is MurmurHash3's finalizer: every input bit reaches every output bit.
func fmix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	return h ^ h>>33
}

// hashOf hashes the keys the snapshot indexes by with cheaper functions
// than maphash.Comparable (which hashes a netip.Addr's zone pointer too).
func hashOf[K comparable](k K) uint64 {
	switch k := any(k).(type) {
	case string:
		return maphash.String(seed, k)
	case NetworkAddress:
		a := k.Addr.As16()
		h := fmix64(binary.LittleEndian.Uint64(a[:8])*0x9e3779b97f4a7c15 ^ binary.LittleEndian.Uint64(a[8:]))
		if k.Network != "" {
			h ^= maphash.String(seed, k.Network)
		}
		return h
	case NamespacedHostname:
		return maphash.String(seed, k.Hostname) ^ maphash.String(seed, k.Namespace)>>1
	case [16]byte:
		return fmix64(binary.LittleEndian.Uint64(k[:8])*0x9e3779b97f4a7c15 ^ binary.LittleEndian.Uint64(k[8:]))
	}
	return maphash.Comparable(seed, k)
}

// get returns the value at k.
func (m *shardMap[K, V]) get(k K) (V, bool) {
	if m.root != nil {
		h := hashOf(k)
		if mid := m.root.mids[(h>>fanBits)&(fan-1)]; mid != nil {
			v, ok := mid.leaves[h&(fan-1)][k]
			return v, ok
		}
	}
	var zero V
	return zero, false
}

// len returns the number of entries.
func (m *shardMap[K, V]) len() int { return m.n }

// clone returns a writable version sharing everything with m.
func (m *shardMap[K, V]) clone() shardMap[K, V] {
	return shardMap[K, V]{root: m.root, ver: versions.Add(1), n: m.n}
}

// leaf returns the leaf map of hash h, copying the path to it first
// unless this version created it.
func (m *shardMap[K, V]) leaf(h uint64) map[K]V {
	if m.ver == 0 {
		panic("config: write to a frozen shardMap")
	}
	if m.root == nil || m.root.ver != m.ver {
		r := &smRoot[K, V]{ver: m.ver}
		if m.root != nil {
			r.mids = m.root.mids
		}
		m.root = r
	}
	hi, lo := (h>>fanBits)&(fan-1), h&(fan-1)
	mid := m.root.mids[hi]
	if mid == nil || mid.ver != m.ver {
		c := &smMid[K, V]{ver: m.ver}
		if mid != nil {
			c.leafVer, c.leaves = mid.leafVer, mid.leaves
		}
		m.root.mids[hi], mid = c, c
	}
	if mid.leafVer[lo] != m.ver {
		if l := mid.leaves[lo]; l != nil {
			mid.leaves[lo] = maps.Clone(l)
		} else {
			mid.leaves[lo] = make(map[K]V, 1)
		}
		mid.leafVer[lo] = m.ver
	}
	return mid.leaves[lo]
}

// set stores v at k.
func (m *shardMap[K, V]) set(k K, v V) {
	l := m.leaf(hashOf(k))
	if _, ok := l[k]; !ok {
		m.n++
	}
	l[k] = v
}

// del removes k.
func (m *shardMap[K, V]) del(k K) {
	if _, ok := m.get(k); !ok {
		return
	}
	delete(m.leaf(hashOf(k)), k)
	m.n--
}

// freeze ends writes: the version may now be shared.
func (m *shardMap[K, V]) freeze() { m.ver = 0 }

// all calls fn for every entry, in no particular order, until fn returns false.
func (m *shardMap[K, V]) all(fn func(K, V) bool) {
	if m.root == nil {
		return
	}
	for _, mid := range m.root.mids {
		if mid == nil {
			continue
		}
		for _, l := range mid.leaves {
			for k, v := range l {
				if !fn(k, v) {
					return
				}
			}
		}
	}
}

// diffShards calls fn for every key whose value differs between a and b by
// changed (absent on one side: the zero value and false). Nodes the two
// versions share are skipped without being read, so two versions derived
// from one another compare in O(nodes on the changed paths + entries of
// the leaves that differ).
func diffShards[K comparable, V any](a, b *shardMap[K, V], changed func(x, y V) bool, fn func(k K, old V, oldOK bool, new V, newOK bool)) {
	var empty smRoot[K, V]
	var emptyMid smMid[K, V]
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
	for i := range fan {
		ma, mb := ra.mids[i], rb.mids[i]
		if ma == mb {
			continue
		}
		if ma == nil {
			ma = &emptyMid
		}
		if mb == nil {
			mb = &emptyMid
		}
		for j := range fan {
			la, lb := ma.leaves[j], mb.leaves[j]
			if sameMap(la, lb) {
				continue
			}
			for k, x := range la {
				y, ok := lb[k]
				if !ok || changed(x, y) {
					fn(k, x, true, y, ok)
				}
			}
			for k, y := range lb {
				if _, ok := la[k]; !ok {
					var zero V
					fn(k, zero, false, y, true)
				}
			}
		}
	}
}

// sameMap reports whether a and b are the same map (not merely equal):
// the same runtime map, as shared by versions derived from one another.
func sameMap[K comparable, V any](a, b map[K]V) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

// ipIndex maps network addresses to workloads. Addresses of the default
// network without a zone — nearly all of them — are keyed by their 16
// bytes (a 24-byte map slot with the pointer, where a NetworkAddress key
// makes it 48); the others by NetworkAddress. Addresses are unmapped
// before they get here, so an IPv4 address and an IPv6 one never share
// 16 bytes.
type ipIndex struct {
	def   shardMap[[16]byte, *Workload]
	other shardMap[NetworkAddress, *Workload]
}

func compactIP(na NetworkAddress) ([16]byte, bool) {
	if na.Network != "" || !na.Addr.IsValid() || na.Addr.Zone() != "" {
		return [16]byte{}, false
	}
	return na.Addr.As16(), true
}

func (x *ipIndex) get(na NetworkAddress) (*Workload, bool) {
	if k, ok := compactIP(na); ok {
		return x.def.get(k)
	}
	return x.other.get(na)
}

func (x *ipIndex) set(na NetworkAddress, w *Workload) {
	if k, ok := compactIP(na); ok {
		x.def.set(k, w)
		return
	}
	x.other.set(na, w)
}

func (x *ipIndex) del(na NetworkAddress) {
	if k, ok := compactIP(na); ok {
		x.def.del(k)
		return
	}
	x.other.del(na)
}

func (x *ipIndex) clone() ipIndex { return ipIndex{def: x.def.clone(), other: x.other.clone()} }

func (x *ipIndex) freeze() {
	x.def.freeze()
	x.other.freeze()
}
