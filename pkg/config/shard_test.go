package config

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"testing"
)

// TestShardMapVersions drives shardMap with random sets and deletes over
// many versions and checks each against a plain map: lookups, length,
// iteration, the diff between consecutive versions, and that a frozen
// version never changes after a later one is written.
func TestShardMapVersions(t *testing.T) {
	for _, keys := range []int{10, 300, 5_000} {
		t.Run(fmt.Sprint(keys), func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, uint64(keys)))
			var m shardMap[string, int]
			ref := map[string]int{}
			type frozen struct {
				m   shardMap[string, int]
				ref map[string]int
			}
			var old []frozen
			for v := range 30 {
				prev, prevRef := m, maps.Clone(ref)
				m = m.clone()
				ops := 1 + r.IntN(keys/2+1)
				if v == 0 {
					ops = keys // a bulk build, as NewSnapshot does
				}
				for range ops {
					k := fmt.Sprintf("Kubernetes//Pod/ns-%d/w-%d", r.IntN(7), r.IntN(keys))
					if r.IntN(3) == 0 {
						m.del(k)
						delete(ref, k)
					} else {
						x := r.Int()
						m.set(k, x)
						ref[k] = x
					}
				}
				m.freeze()
				checkShard(t, &m, ref)

				got := map[string]bool{}
				diffShards(&prev, &m, func(x, y int) bool { return x != y }, func(k string, o int, ook bool, n int, nok bool) {
					if got[k] {
						t.Fatalf("version %d: diff reports %q twice", v, k)
					}
					got[k] = true
					po, pok := prevRef[k]
					nn, nnok := ref[k]
					if o != po || ook != pok || n != nn || nok != nnok {
						t.Fatalf("version %d: diff %q = (%d,%v)->(%d,%v), want (%d,%v)->(%d,%v)", v, k, o, ook, n, nok, po, pok, nn, nnok)
					}
				})
				for k, x := range ref {
					if y, ok := prevRef[k]; (!ok || x != y) && !got[k] {
						t.Fatalf("version %d: diff misses changed %q", v, k)
					}
				}
				for k := range prevRef {
					if _, ok := ref[k]; !ok && !got[k] {
						t.Fatalf("version %d: diff misses removed %q", v, k)
					}
				}
				old = append(old, frozen{m, maps.Clone(ref)})
			}
			for _, f := range old {
				checkShard(t, &f.m, f.ref)
			}
		})
	}
}

func checkShard(t *testing.T, m *shardMap[string, int], ref map[string]int) {
	t.Helper()
	if m.len() != len(ref) {
		t.Fatalf("len %d, want %d", m.len(), len(ref))
	}
	for k, x := range ref {
		if y, ok := m.get(k); !ok || y != x {
			t.Fatalf("get %q = %d, %v; want %d", k, y, ok, x)
		}
	}
	if _, ok := m.get("absent"); ok {
		t.Fatal("get of an absent key succeeded")
	}
	n := 0
	m.all(func(k string, x int) bool {
		if ref[k] != x {
			t.Fatalf("all: %q = %d, want %d", k, x, ref[k])
		}
		n++
		return true
	})
	if n != len(ref) {
		t.Fatalf("all visited %d, want %d", n, len(ref))
	}
}

// TestShardMapFreezeTrims checks that a bulk build keeps no doubling slack
// in its leaves once frozen.
func TestShardMapFreezeTrims(t *testing.T) {
	for _, reserve := range []bool{false, true} {
		t.Run(fmt.Sprint("reserve=", reserve), func(t *testing.T) { testFreezeTrims(t, reserve) })
	}
}

func testFreezeTrims(t *testing.T, reserve bool) {
	key := func(i int) (k [16]byte) {
		k[0], k[1], k[2] = byte(i), byte(i>>8), byte(i>>16)
		return k
	}
	m := (&shardMap[[16]byte, *Workload]{}).clone()
	if reserve {
		m.reserve(func(yield func([16]byte) bool) {
			for i := range 100_000 {
				if !yield(key(i)) {
					return
				}
			}
		})
	}
	for i := range 100_000 {
		m.set(key(i), nil)
	}
	if reserve {
		if len(m.grown) != fan*fan {
			t.Fatalf("%d leaves grew or were created, want each of the %d created once", len(m.grown), fan*fan)
		}
	}
	m.freeze()
	spare := 0
	for _, mid := range m.root.mids {
		for _, l := range mid.leaves {
			spare += cap(l.e) - len(l.e)
		}
	}
	if spare > m.len()/8 {
		t.Fatalf("%d spare entries after freeze for %d entries", spare, m.len())
	}
	for _, i := range []int{0, 1, 4095, 4096, 99_999} {
		var k [16]byte
		k[0], k[1], k[2] = byte(i), byte(i>>8), byte(i>>16)
		if _, ok := m.get(k); !ok {
			t.Fatalf("entry %d missing", i)
		}
		k[3] = 1
		if _, ok := m.get(k); ok {
			t.Fatalf("absent key %v found", k)
		}
	}

}
