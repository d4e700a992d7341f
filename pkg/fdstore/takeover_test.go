package fdstore

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// A new holder on the same path copies the old one's entries, takes the
// path, and the old one refuses puts naming it; clients of the old one
// follow the path to the new one by themselves.
func TestTakeover(t *testing.T) {
	path := sockPath(t)
	old := startAt(t, path, Config{})
	ctx := t.Context()
	agent := dial(t, path)
	addrs := map[string]string{}
	for _, name := range []string{"outbound4", "inbound", "hbone"} {
		ln := listenTCP(t)
		if err := agent.Put(ctx, Key(42, name), ln); err != nil {
			t.Fatal(err)
		}
		addrs[Key(42, name)] = ln.Addr().String()
		ln.Close() // only the holder keeps it now
	}
	oldConn := rawDial(t, path)
	if info, err := (&rawConn{fc: oldConn}).hello(ctx); err != nil || info.ID != old.Info().ID {
		t.Fatalf("hello to the old holder: %+v, %v", info, err)
	}

	start := time.Now()
	nw := startAt(t, path, Config{})
	t.Logf("take-over of %d entries took %v", old.Len(), time.Since(start))
	if nw.Len() != 3 {
		t.Fatalf("new holder has %d entries, want 3", nw.Len())
	}
	by, ok := old.SupersededBy()
	if !ok || by.ID != nw.Info().ID {
		t.Fatalf("old SupersededBy = %+v, %v", by, ok)
	}

	// Clients dialing the path now reach the new holder.
	if info, err := dial(t, path).Info(ctx); err != nil || info.ID != nw.Info().ID || info.Entries != 3 {
		t.Fatalf("Info via the path = %+v, %v", info, err)
	}

	// A put on a connection to the old holder is refused, naming the new one.
	ln := listenTCP(t)
	sc, _ := ln.SyscallConn()
	var perr error
	sc.Control(func(fd uintptr) {
		perr = (&rawConn{fc: oldConn}).roundTrip(ctx, &request{Op: opPut, Key: Key(42, "late")}, []int{int(fd)}, func(*reply, []int) error { return nil })
	})
	var fe *Error
	if !errors.Is(perr, ErrSuperseded) || !errors.As(perr, &fe) || fe.Holder == nil || fe.Holder.ID != nw.Info().ID || !strings.Contains(perr.Error(), nw.Info().ID) {
		t.Fatalf("put to the old holder = %v, want ErrSuperseded naming %s", perr, nw.Info().ID)
	}
	if old.Len() != 3 {
		t.Fatalf("old holder took the put: %d entries", old.Len())
	}

	// The agent's client was connected to the old holder: it follows the path.
	if err := agent.Put(ctx, Key(42, "late"), ln); err != nil {
		t.Fatalf("agent put after the take-over: %v", err)
	}
	if nw.Len() != 4 || agent.Holder().ID != nw.Info().ID {
		t.Fatalf("new holder %d entries, agent at %v", nw.Len(), agent.Holder())
	}

	// The old holder stops: the sockets live on in the new one, and the
	// path stays the new one's.
	old.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("old holder removed the new one's socket: %v", err)
	}
	next := dial(t, path)
	for key, addr := range addrs {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			t.Fatalf("%s after the old holder stopped: %v", key, err)
		}
		conn.Write([]byte("x"))
		f, err := next.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		l, err := ListenerFromFD(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		acceptAndEcho(t, l, "x")
		expectEcho(t, conn, "x")
		conn.Close()
		l.Close()
	}

	// And a third holder takes over from the second.
	third := startAt(t, path, Config{})
	if third.Len() != 4 {
		t.Fatalf("third holder has %d entries", third.Len())
	}
	if keys, err := next.List(ctx); err != nil || len(keys) != 4 || next.Holder().ID != third.Info().ID {
		t.Fatalf("List via the path = %q, %v (holder %v)", keys, err, next.Holder())
	}
}

// While a take-over copies, the old holder refuses changes (so none is
// lost) and serves reads; a client's put retries until the new holder has
// the path, and lands there.
func TestTakeoverFreeze(t *testing.T) {
	path := sockPath(t)
	old := startAt(t, path, Config{})
	ctx := t.Context()
	agent := dial(t, path)
	if err := agent.Put(ctx, "a", listenTCP(t)); err != nil {
		t.Fatal(err)
	}
	other := rawDial(t, path)
	ln := listenTCP(t)
	putDone := make(chan error, 1)
	var retried time.Duration
	testHookBeforeRename = func() {
		// Frozen: a change is refused with "takeover", a read is served.
		sc, _ := ln.SyscallConn()
		var err error
		sc.Control(func(fd uintptr) {
			err = (&rawConn{fc: other}).roundTrip(ctx, &request{Op: opPut, Key: "b"}, []int{int(fd)}, func(*reply, []int) error { return nil })
		})
		if !errors.Is(err, ErrTakeover) {
			t.Errorf("put during the take-over = %v, want ErrTakeover", err)
		}
		if err := (&rawConn{fc: other}).roundTrip(ctx, &request{Op: opDelete, Key: "a"}, nil, func(*reply, []int) error { return nil }); !errors.Is(err, ErrTakeover) {
			t.Errorf("delete during the take-over = %v, want ErrTakeover", err)
		}
		if f, err := agent.Get(ctx, "a"); err != nil {
			t.Errorf("get during the take-over: %v", err)
		} else {
			f.Close()
		}
		start := time.Now()
		go func() {
			err := agent.Put(ctx, "b", ln)
			retried = time.Since(start)
			putDone <- err
		}()
		time.Sleep(100 * time.Millisecond)
	}
	defer func() { testHookBeforeRename = nil }()
	nw := startAt(t, path, Config{})
	testHookBeforeRename = nil
	if err := <-putDone; err != nil {
		t.Fatalf("put retried across the take-over: %v", err)
	}
	t.Logf("a put during the take-over landed after %v", retried)
	if got, err := dial(t, path).List(ctx); err != nil || !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("new holder List = %q, %v", got, err)
	}
	if old.Len() != 1 {
		t.Fatalf("old holder has %d entries, want 1 (frozen)", old.Len())
	}
	_ = nw
}

// A take-over whose new holder goes away before "superseded": the old
// holder serves on, counts as superseded by whoever answers at the path,
// or takes the path back from a dead socket. No change is lost.
func TestTakeoverAbandoned(t *testing.T) {
	tests := []struct {
		name string
		// afterFreeze runs while the fake new holder's connection holds the
		// freeze; it returns the ID expected to answer at the path after
		// that connection closes ("" for the old holder).
		afterFreeze func(t *testing.T, path string) string
		superseded  bool
	}{
		{"before the rename", func(t *testing.T, path string) string { return "" }, false},
		{"after the rename, new holder dead", func(t *testing.T, path string) string {
			ln, _, err := bindAt(path)
			if err != nil {
				t.Fatal(err)
			}
			ln.Close() // a socket file nothing answers on
			return ""
		}, false},
		{"after the rename, new holder alive", func(t *testing.T, path string) string {
			other := startAt(t, filepath.Join(filepath.Dir(path), "other.sock"), Config{})
			if err := os.Rename(filepath.Join(filepath.Dir(path), "other.sock"), path); err != nil {
				t.Fatal(err)
			}
			return other.Info().ID
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := sockPath(t)
			old := startAt(t, path, Config{})
			ctx := t.Context()
			c := dial(t, path)
			if err := c.Put(ctx, "a", listenTCP(t)); err != nil {
				t.Fatal(err)
			}
			taker := rawDial(t, path)
			fake := &HolderInfo{ID: "fake", PID: 1, Path: path}
			if err := (&rawConn{fc: taker}).roundTrip(ctx, &request{Op: opTakeover, Holder: fake}, nil, func(*reply, []int) error { return nil }); err != nil {
				t.Fatal(err)
			}
			// A second take-over at once is refused.
			if err := (&rawConn{fc: rawDial(t, path)}).roundTrip(ctx, &request{Op: opTakeover, Holder: &HolderInfo{ID: "second"}}, nil, func(*reply, []int) error { return nil }); !errors.Is(err, ErrTakeover) {
				t.Fatalf("second take-over = %v", err)
			}
			want := tt.afterFreeze(t, path)
			if want == "" {
				want = old.Info().ID
			}
			// A put waits out the freeze, retrying.
			putDone := make(chan error, 1)
			go func() {
				pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				putDone <- c.Put(pctx, "b", listenTCP(t))
			}()
			time.Sleep(50 * time.Millisecond)
			taker.close()
			if err := <-putDone; err != nil {
				t.Fatalf("put across the abandoned take-over: %v", err)
			}
			waitFor(t, "the old holder to handle the lost take-over", func() bool { return old.Info().TakeoverBy == nil })
			if _, ok := old.SupersededBy(); ok != tt.superseded {
				t.Fatalf("old superseded = %v, want %v", ok, tt.superseded)
			}
			info, err := dial(t, path).Info(ctx)
			if err != nil || info.ID != want {
				t.Fatalf("holder at the path = %+v, %v; want %s", info, err, want)
			}
			if c.Holder().ID != want {
				t.Fatalf("client at %v, want %s", c.Holder(), want)
			}
		})
	}
}
