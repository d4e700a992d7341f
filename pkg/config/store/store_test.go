package store

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
)

func wl(uid, node, ip, netns string) *config.Workload {
	return &config.Workload{
		UID: uid, Name: uid, Namespace: "default", Node: node, Paths: &config.LocalPaths{NetnsPath: netns}, Protocol: config.ProtocolHBONE,
		WorkloadIPs: []netip.Addr{netip.MustParseAddr(ip)},
	}
}

func snap(t *testing.T, ws ...*config.Workload) *config.Snapshot {
	t.Helper()
	s, err := config.NewSnapshot(config.Config{Workloads: ws}, config.Options{Node: "n1", CheckNetns: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func uids(ws []*config.Workload) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.UID)
	}
	return out
}

func eq(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestDiff(t *testing.T) {
	a := wl("a", "n1", "198.18.1.1", "/run/netns/a")
	b := wl("b", "n1", "198.18.1.2", "/run/netns/b")
	remote := wl("r", "n2", "198.18.2.1", "")
	bMoved := wl("b", "n1", "198.18.1.2", "/run/netns/b2")
	bCap := wl("b", "n1", "198.18.1.2", "/run/netns/b")
	bCap.Capacity = 7
	c := wl("c", "n1", "198.18.1.3", "/run/netns/c")
	bLeft := wl("b", "n1", "198.18.1.2", "/run/netns/b")
	bLeft.Protocol = config.ProtocolTCP

	cases := []struct {
		name               string
		old, new           []*config.Workload
		added, removed     []string
		changed            []string
		reenroll, services bool
		policies           bool
	}{
		{"first load", nil, []*config.Workload{a, b, remote}, []string{"a", "b"}, nil, nil, false, true, true},
		{"no change", []*config.Workload{a, b}, []*config.Workload{a, b}, nil, nil, nil, false, false, false},
		{"remove and add", []*config.Workload{a, b}, []*config.Workload{b, c}, []string{"c"}, []string{"a"}, nil, false, true, true},
		{"netns moved", []*config.Workload{a, b}, []*config.Workload{a, bMoved}, nil, nil, []string{"b"}, true, true, false},
		{"capacity only", []*config.Workload{a, b}, []*config.Workload{a, bCap}, nil, nil, []string{"b"}, false, true, false},
		{"remote only", []*config.Workload{a}, []*config.Workload{a, remote}, nil, nil, nil, false, true, true},
		{"leaves the mesh", []*config.Workload{a, b}, []*config.Workload{a, bLeft}, nil, []string{"b"}, nil, false, true, false},
		{"joins the mesh", []*config.Workload{a, bLeft}, []*config.Workload{a, b}, []string{"b"}, nil, nil, false, true, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ch := Diff(snap(t, tc.old...), snap(t, tc.new...))
			if !eq(uids(ch.Added), tc.added) || !eq(uids(ch.Removed), tc.removed) {
				t.Errorf("added %v removed %v, want %v %v", uids(ch.Added), uids(ch.Removed), tc.added, tc.removed)
			}
			var changed []string
			for _, c := range ch.Changed {
				changed = append(changed, c.New.UID)
				if c.Reenroll() != tc.reenroll {
					t.Errorf("Reenroll(%s) = %v", c.New.UID, c.Reenroll())
				}
			}
			if !eq(changed, tc.changed) {
				t.Errorf("changed %v, want %v", changed, tc.changed)
			}
			if ch.ServicesChanged != tc.services || ch.PoliciesChanged != tc.policies {
				t.Errorf("services %v policies %v, want %v %v", ch.ServicesChanged, ch.PoliciesChanged, tc.services, tc.policies)
			}
		})
	}
}

func TestDiffPolicies(t *testing.T) {
	base := config.Config{Workloads: []*config.Workload{wl("a", "n2", "198.18.1.1", "")}}
	withPolicy := base
	withPolicy.Policies = []*config.AuthorizationPolicy{{Name: "p", Namespace: "default", Scope: config.ScopeNamespace, Action: config.ActionDeny}}
	s1, err := config.NewSnapshot(base, config.Options{Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := config.NewSnapshot(withPolicy, config.Options{Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	if ch := Diff(s1, s2); !ch.PoliciesChanged || ch.ServicesChanged {
		t.Errorf("policy added: %+v", ch)
	}
}

func TestStorePublishAndSubscribe(t *testing.T) {
	st := New("n1")
	if st.Current() == nil || len(st.Current().Workloads()) != 0 || st.Generation() != 0 {
		t.Fatal("new store is not empty")
	}
	select {
	case <-st.Loaded():
		t.Fatal("loaded before publish")
	default:
	}
	sub := st.Subscribe()
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	a := wl("a", "n1", "198.18.1.1", "/run/netns/a")
	b := wl("b", "n1", "198.18.1.2", "/run/netns/b")
	if gen := st.Publish(snap(t, a)); gen != 1 {
		t.Fatalf("generation %d", gen)
	}
	<-st.Loaded()
	ch, err := sub.Next(ctx)
	if err != nil || ch.Generation != 1 || !eq(uids(ch.Added), []string{"a"}) {
		t.Fatalf("first change %+v %v", ch, err)
	}

	// Two publications while the subscriber is busy coalesce into one diff.
	st.Publish(snap(t, a, b))
	st.Publish(snap(t, b))
	ch, err = sub.Next(ctx)
	if err != nil || ch.Generation != 3 || !eq(uids(ch.Added), []string{"b"}) || !eq(uids(ch.Removed), []string{"a"}) {
		t.Fatalf("coalesced change %+v %v", ch, err)
	}

	// A late subscriber sees the whole current state as added.
	late := st.Subscribe()
	defer late.Close()
	ch, err = late.Next(ctx)
	if err != nil || !eq(uids(ch.Added), []string{"b"}) || len(ch.Removed) != 0 {
		t.Fatalf("late subscriber %+v %v", ch, err)
	}

	short, cancelShort := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancelShort()
	if _, err := sub.Next(short); err != context.DeadlineExceeded {
		t.Fatalf("Next without change = %v", err)
	}
}

func TestStoreConcurrentReaders(t *testing.T) {
	st := New("n1")
	snaps := []*config.Snapshot{
		snap(t, wl("a", "n1", "198.18.1.1", "/run/netns/a")),
		snap(t, wl("a", "n1", "198.18.1.1", "/run/netns/a"), wl("b", "n1", "198.18.1.2", "/run/netns/b")),
	}
	sub := st.Subscribe()
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reached := make(chan uint64, 1)
	go func() {
		var last uint64
		for {
			ch, err := sub.Next(ctx)
			if err != nil {
				reached <- last
				return
			}
			if ch.Generation <= last {
				t.Errorf("generation went from %d to %d", last, ch.Generation)
			}
			last = ch.Generation
			if last == 200 {
				reached <- last
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 2000 {
				s := st.Current()
				n := len(s.Workloads())
				if n > 2 {
					t.Errorf("workloads %d", n)
				}
				if _, ok := s.WorkloadByIP("", netip.MustParseAddr("198.18.1.1")); n > 0 && !ok {
					t.Error("inconsistent snapshot")
				}
			}
		}()
	}
	for i := range 200 {
		st.Publish(snaps[i%2])
	}
	wg.Wait()
	if got := <-reached; got != 200 {
		t.Errorf("subscriber ended at generation %d, want 200", got)
	}
}
