package config

import (
	"encoding/binary"
	"hash/maphash"
	"sync/atomic"
)

// A shardMap is a two-level trie of 64 × 64 leaves, the key's hash
// choosing the path. A change copies the root (64 pointers), one middle
// node (64 leaves) and one leaf: about 1 KiB plus n/4096 entries (about
// 40 for the byIP index of a 100,000-workload mesh), whatever the size of
// the map, where a flat copy-on-write map would copy all of it.
//
// A leaf is a slice of key/value pairs searched linearly: with n/4096
// entries it costs the size of its entries (24 bytes for a string or a
// 16-byte key and a pointer) where a Go map of that size costs about
// twice that in slack, control bytes and headers, and a lookup compares a
// few dozen keys at most.
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
	// grown lists the leaves this version appended to, trimmed to their
	// length by freeze.
	grown []*smLeaf[K, V]
	// caps, during a bulk build, holds the number of keys bound for each
	// leaf (reserve): a leaf this version creates is allocated once, to
	// that size.
	caps *[fan * fan]int32
}

// reserve prepares a bulk build of the given keys in this version: each
// leaf it creates or copies is allocated once with room for its keys, so
// the build leaves no trail of outgrown leaves behind (their garbage,
// interleaved with what stays, left holes in the heap's pages that
// outlived it: fragmentation, not live memory).
func (m *shardMap[K, V]) reserve(keys func(yield func(K) bool)) {
	var caps [fan * fan]int32
	for k := range keys {
		caps[hashOf(k)&(fan*fan-1)]++
	}
	m.caps = &caps
}

type smRoot[K comparable, V any] struct {
	ver  uint64
	mids [fan]*smMid[K, V]
}

type smMid[K comparable, V any] struct {
	ver    uint64
	leaves [fan]*smLeaf[K, V]
}

type smLeaf[K comparable, V any] struct {
	ver uint64
	e   []smEntry[K, V]
}

type smEntry[K comparable, V any] struct {
	k K
	v V
}

// at returns the index of k in l, trying i first (a copy of a leaf keeps
// the order of the entries it did not touch), or -1.
func (l *smLeaf[K, V]) at(k K, i int) int {
	if i < len(l.e) && l.e[i].k == k {
		return i
	}
	return l.find(k)
}

// find returns the index of k in l, or -1.
func (l *smLeaf[K, V]) find(k K) int {
	if l == nil {
		return -1
	}
	for i := range l.e {
		if l.e[i].k == k {
			return i
		}
	}
	return -1
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

// leafOf returns the leaf of hash h, nil if there is none.
func (m *shardMap[K, V]) leafOf(h uint64) *smLeaf[K, V] {
	if m.root == nil {
		return nil
	}
	if mid := m.root.mids[(h>>fanBits)&(fan-1)]; mid != nil {
		return mid.leaves[h&(fan-1)]
	}
	return nil
}

// get returns the value at k.
func (m *shardMap[K, V]) get(k K) (V, bool) {
	l := m.leafOf(hashOf(k))
	if i := l.find(k); i >= 0 {
		return l.e[i].v, true
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

// leaf returns the leaf of hash h, copying the path to it first unless
// this version created it. The copy keeps the entries' order and has room
// for one more entry, or for the keys reserve counted for it.
func (m *shardMap[K, V]) leaf(h uint64) *smLeaf[K, V] {
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
			c.leaves = mid.leaves
		}
		m.root.mids[hi], mid = c, c
	}
	l := mid.leaves[lo]
	if l == nil || l.ver != m.ver {
		c := &smLeaf[K, V]{ver: m.ver}
		room := 1
		if m.caps != nil {
			room = int(m.caps[h&(fan*fan-1)])
			m.grown = append(m.grown, c)
		}
		var old []smEntry[K, V]
		if l != nil {
			old = l.e
		}
		c.e = make([]smEntry[K, V], len(old), len(old)+room)
		copy(c.e, old)
		mid.leaves[lo], l = c, c
	}
	return l
}

// set stores v at k.
func (m *shardMap[K, V]) set(k K, v V) {
	l := m.leaf(hashOf(k))
	if i := l.find(k); i >= 0 {
		l.e[i].v = v
		return
	}
	if len(l.e) == cap(l.e) {
		m.grown = append(m.grown, l)
	}
	l.e = append(l.e, smEntry[K, V]{k, v})
	m.n++
}

// del removes k.
func (m *shardMap[K, V]) del(k K) {
	h := hashOf(k)
	i := m.leafOf(h).find(k)
	if i < 0 {
		return
	}
	l := m.leaf(h) // a copy keeps the order: k is still at i
	last := len(l.e) - 1
	l.e[i] = l.e[last]
	l.e[last] = smEntry[K, V]{} // no stale pointer behind the length
	l.e = l.e[:last]
	m.n--
}

// freeze ends writes: the version may now be shared. Leaves that grew in
// this version give back their spare capacity (appends double it).
func (m *shardMap[K, V]) freeze() {
	for _, l := range m.grown {
		if cap(l.e) > len(l.e)+len(l.e)/8 {
			e := make([]smEntry[K, V], len(l.e))
			copy(e, l.e)
			l.e = e
		}
	}
	m.grown = nil
	m.caps = nil
	m.ver = 0
}

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
			if l == nil {
				continue
			}
			for _, e := range l.e {
				if !fn(e.k, e.v) {
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
	var emptyLeaf smLeaf[K, V]
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
			if la == lb {
				continue
			}
			if la == nil {
				la = &emptyLeaf
			}
			if lb == nil {
				lb = &emptyLeaf
			}
			for x := range la.e {
				k := la.e[x].k
				if y := lb.at(k, x); y < 0 {
					var zero V
					fn(k, la.e[x].v, true, zero, false)
				} else if changed(la.e[x].v, lb.e[y].v) {
					fn(k, la.e[x].v, true, lb.e[y].v, true)
				}
			}
			for y := range lb.e {
				if k := lb.e[y].k; la.at(k, y) < 0 {
					var zero V
					fn(k, zero, false, lb.e[y].v, true)
				}
			}
		}
	}
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
