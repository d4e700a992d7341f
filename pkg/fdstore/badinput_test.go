package fdstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/warren-mesh/warren/internal/testenv"
	"golang.org/x/sys/unix"
)

// sendFrame writes a frame with an arbitrary body and fds.
func sendFrame(t *testing.T, fc *frameConn, body string, fds []int) {
	t.Helper()
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	msg = append(msg, body...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := fc.c.WriteMsgUnix(msg, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func pipeFDs(t *testing.T) (int, int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	return p[0], p[1]
}

func socketFD(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// Whatever a client sends, it gets an error reply (or, for a frame it
// cannot be in step after, a closed connection), the holder closes every
// fd it received with it, and the holder keeps serving.
func TestBadInput(t *testing.T) {
	srv, path := startServer(t, Config{MaxFDs: 2})
	ok := dial(t, path)
	if err := ok.Put(t.Context(), "held", listenTCP(t)); err != nil {
		t.Fatal(err)
	}
	baseline := countFDs(t)

	tests := []struct {
		name     string
		send     func(t *testing.T, fc *frameConn)
		wantCode string // "" expects no reply
		wantMsg  string
		closes   bool // the holder closes the connection after it
	}{
		{"garbage bytes", func(t *testing.T, fc *frameConn) {
			fc.c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		}, codeTooLarge, "exceeds the limit", true},
		{"oversized message", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"`+strings.Repeat("k", MaxRequestSize)+`"}`, nil)
		}, codeTooLarge, "exceeds the limit", true},
		{"oversized with fds", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, strings.Repeat(" ", MaxRequestSize+1), []int{socketFD(t)})
		}, codeTooLarge, "exceeds the limit", true},
		{"not JSON", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":`, nil)
		}, codeBadRequest, "cannot parse", false},
		{"empty frame", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, ``, nil)
		}, codeBadRequest, "cannot parse", false},
		{"unknown op", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"format-disk"}`, nil)
		}, codeBadRequest, "unknown op", false},
		{"claims an fd without SCM_RIGHTS", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"k","fds":1}`, nil)
		}, codeBadRequest, "claims 1 fds, carried 0", false},
		{"fd without a claim", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"k"}`, []int{socketFD(t)})
		}, codeBadRequest, "claims 0 fds, carried 1", false},
		{"non-socket fd", func(t *testing.T, fc *frameConn) {
			r, _ := pipeFDs(t)
			sendFrame(t, fc, `{"op":"put","key":"k","fds":1}`, []int{r})
		}, codeBadRequest, "not a socket", false},
		{"two fds in a put", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"k","fds":2}`, []int{socketFD(t), socketFD(t)})
		}, codeBadRequest, "carries 2 fds, want 1", false},
		{"fds on a get", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"get","key":"held","fds":1}`, []int{socketFD(t)})
		}, codeBadRequest, "get carries no fds", false},
		{"253 fds", func(t *testing.T, fc *frameConn) {
			fd := socketFD(t)
			fds := make([]int, scmMaxFD)
			for i := range fds {
				fds[i] = fd
			}
			sendFrame(t, fc, `{"op":"hello","fds":253}`, fds)
		}, codeBadRequest, "hello carries no fds", false},
		{"one frame, fds in many pieces", func(t *testing.T, fc *frameConn) {
			fd := socketFD(t)
			fds := make([]int, 200)
			for i := range fds {
				fds[i] = fd
			}
			body := `{"op":"hello"}`
			fc.c.WriteMsgUnix(binary.BigEndian.AppendUint32(nil, uint32(len(body))), unix.UnixRights(fds...), nil)
			for i := range 3 {
				if _, _, err := fc.c.WriteMsgUnix([]byte(body[i:i+1]), unix.UnixRights(fds...), nil); err != nil {
					return // the holder hung up already
				}
			}
		}, codeBadRequest, "more than 506 fds", true},
		{"empty key", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"","fds":1}`, []int{socketFD(t)})
		}, codeBadRequest, "empty key", false},
		{"key too long", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"`+strings.Repeat("k", MaxKeyLen+1)+`","fds":1}`, []int{socketFD(t)})
		}, codeBadRequest, "exceeds 1024", false},
		{"key with NUL", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"a\u0000b","fds":1}`, []int{socketFD(t)})
		}, codeBadRequest, "control character", false},
		{"key with a newline", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"put","key":"a\nb","fds":1}`, []int{socketFD(t)})
		}, codeBadRequest, "control character", false},
		{"superseded without take-over", func(t *testing.T, fc *frameConn) {
			sendFrame(t, fc, `{"op":"superseded","holder":{"id":"x"}}`, nil)
		}, codeBadRequest, "without a take-over", false},
		{"too many fds held", func(t *testing.T, fc *frameConn) {
			// MaxFDs is 2 and "held" is one: "k2" fits, "k3" does not.
			sendFrame(t, fc, `{"op":"put","key":"k2","fds":1}`, []int{socketFD(t)})
			if r, fds, err := readReply(fc); err != nil || !r.OK || len(fds) != 0 {
				t.Fatalf("put k2: %+v, %v", r, err)
			}
			sendFrame(t, fc, `{"op":"put","key":"k3","fds":1}`, []int{socketFD(t)})
		}, codeFull, "maximum of 2 fds", false},
		{"half a frame, then gone", func(t *testing.T, fc *frameConn) {
			fc.c.Write([]byte{0, 0, 1, 0, '{'})
			fc.c.CloseWrite()
		}, "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fc := rawDial(t, path)
			tt.send(t, fc)
			r, fds, err := readReply(fc)
			if tt.wantCode == "" {
				if err == nil {
					t.Fatalf("reply %+v, want none", r)
				}
			} else {
				if err != nil {
					t.Fatalf("no reply: %v", err)
				}
				closeFDs(fds)
				if r.OK || r.Code != tt.wantCode || !strings.Contains(r.Error, tt.wantMsg) || len(fds) != 0 {
					t.Fatalf("reply %+v, want code %s with %q", r, tt.wantCode, tt.wantMsg)
				}
			}
			// The connection goes on, or is closed; either way the holder serves.
			sendFrameOK := func() error {
				b := binary.BigEndian.AppendUint32(nil, uint32(len(`{"op":"hello"}`)))
				_, err := fc.c.Write(append(b, `{"op":"hello"}`...))
				return err
			}
			werr := sendFrameOK()
			r, _, rerr := readReply(fc)
			if tt.closes {
				if werr == nil && rerr == nil {
					t.Fatalf("connection still served after %s: %+v", tt.name, r)
				}
			} else if werr != nil || rerr != nil || !r.OK {
				t.Fatalf("connection unusable after %s: %v, %v, %+v", tt.name, werr, rerr, r)
			}
			if _, err := ok.List(t.Context()); err != nil {
				t.Fatalf("holder stopped serving: %v", err)
			}
		})
	}
	got, err := ok.List(t.Context())
	if err != nil || strings.Join(got, ",") != "held,k2" {
		t.Fatalf("List after bad input = %q, %v", got, err)
	}
	if srv.Len() != 2 {
		t.Fatalf("Len %d", srv.Len())
	}
	// Everything received with bad input was closed (one more fd: "k2").
	waitFor(t, "the holder to close what it refused", func() bool { return countFDs(t) <= baseline+1 })
}

func TestTooManyConnections(t *testing.T) {
	_, path := startServer(t, Config{MaxConns: 1})
	first := dial(t, path)
	_, err := Dial(t.Context(), path)
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("second Dial = %v, want ErrBusy", err)
	}
	first.Close()
	waitFor(t, "a free connection slot", func() bool {
		c, err := Dial(t.Context(), path)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// A peer with another effective UID is refused before it is heard. The
// test opens the file modes (the holder's own check is what is tested)
// and connects from one thread with euid 65534.
func TestOtherUIDRefused(t *testing.T) {
	testenv.RequireRoot(t)
	srv, path := startServer(t, Config{})
	dir := path[:strings.LastIndexByte(path, '/')]
	for _, p := range []string{dir[:strings.LastIndexByte(dir, '/')], dir} {
		os.Chmod(p, 0o755)
	}
	os.Chmod(path, 0o666)

	fd, err := connectAs(path, 65534)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "as-nobody")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	fc := newFrameConn(conn.(*net.UnixConn), MaxReplySize)
	defer fc.close()
	err = (&rawConn{fc: fc}).roundTrip(t.Context(), &request{Op: opList}, nil, func(*reply, []int) error { return nil })
	if !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), "peer uid 65534") {
		t.Fatalf("list as uid 65534 = %v, want ErrForbidden", err)
	}
	if _, err := dial(t, path).List(t.Context()); err != nil {
		t.Fatalf("holder stopped serving: %v", err)
	}
	if srv.Len() != 0 {
		t.Fatal("entries appeared")
	}
}

// connectAs connects to the unix socket at path from a thread whose
// effective UID is uid (credentials are per thread in Linux; the raw
// syscall changes only this one), then restores the thread's.
func connectAs(path string, uid int) (int, error) {
	runtime.LockOSThread()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return -1, err
	}
	keep := ^uintptr(0) // -1: unchanged
	if _, _, e := syscall.RawSyscall(unix.SYS_SETRESUID, keep, uintptr(uid), keep); e != 0 {
		runtime.UnlockOSThread()
		unix.Close(fd)
		return -1, e
	}
	cerr := unix.Connect(fd, &unix.SockaddrUnix{Name: path})
	if _, _, e := syscall.RawSyscall(unix.SYS_SETRESUID, keep, 0, keep); e != 0 {
		// Leave the thread locked: the runtime discards it.
		unix.Close(fd)
		return -1, e
	}
	runtime.UnlockOSThread()
	if cerr != nil {
		unix.Close(fd)
		return -1, cerr
	}
	return fd, nil
}

// Replies larger than a frame's worth come in several frames.
func TestManyEntriesChunked(t *testing.T) {
	const n = 3*MaxFDsPerFrame + 5
	srv, path := startServer(t, Config{})
	c := dial(t, path)
	ln := listenTCP(t)
	long := strings.Repeat("x", MaxKeyLen-20)
	for i := range n {
		if err := c.Put(t.Context(), fmt.Sprintf("%s/%05d", long, i), ln); err != nil {
			t.Fatal(err)
		}
	}
	if srv.Len() != n {
		t.Fatalf("Len %d", srv.Len())
	}
	keys, err := c.List(t.Context())
	if err != nil || len(keys) != n {
		t.Fatalf("List: %d keys, %v", len(keys), err)
	}
	start := time.Now()
	es, err := c.GetPrefix(t.Context(), "")
	if err != nil || len(es) != n {
		t.Fatalf("GetPrefix: %d, %v", len(es), err)
	}
	t.Logf("GetPrefix of %d fds in %v", n, time.Since(start))
	for i, e := range es {
		if e.Key != keys[i] {
			t.Fatalf("entry %d: %s, want %s", i, e.Key, keys[i])
		}
	}
	closeEntries(es)
}
