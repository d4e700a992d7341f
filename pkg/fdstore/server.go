package fdstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// DefaultPath is where the node's holder listens.
const DefaultPath = "/var/run/warren/fdstore.sock"

// Defaults of Config.
const (
	DefaultMaxFDs          = 65536
	DefaultMaxConns        = 256
	DefaultTakeoverTimeout = 30 * time.Second
	replyTimeout           = 10 * time.Second
)

// Config configures a Server.
type Config struct {
	// Path of the unix socket (DefaultPath when empty). Its directory is
	// created 0700 if missing; the socket is 0600.
	Path string
	// MaxFDs bounds the fds held (DefaultMaxFDs when zero). A put of a new
	// key beyond it gets ErrFull.
	MaxFDs int
	// MaxConns bounds concurrent client connections (DefaultMaxConns when
	// zero); one more is answered ErrBusy and closed.
	MaxConns int
	// TakeoverTimeout bounds Start's wait for the take-over lock and its
	// copy from an older holder (DefaultTakeoverTimeout when zero).
	TakeoverTimeout time.Duration
	// Logger receives the holder's logs (slog.Default() when nil).
	Logger *slog.Logger
}

// Server is a holder: it keeps named fds for its clients, and keeps them
// open while no client runs. See the package documentation.
type Server struct {
	cfg      Config
	log      *slog.Logger
	uid      int
	lockPath string
	self     HolderInfo // immutable fields

	mu         sync.Mutex
	entries    map[string]int
	conns      map[*serverConn]struct{}
	listeners  []*net.UnixListener
	sockID     fileID // the socket file this holder bound at Path
	lease      *serverConn
	leaseBy    *HolderInfo
	superseded *HolderInfo
	closed     bool
	nextConn   uint64

	wg        sync.WaitGroup
	closeOnce sync.Once
	done      chan struct{}
	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
}

// fileID identifies a file across renames.
type fileID struct{ dev, ino uint64 }

func statID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fileID{}, err
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// Start makes a holder at cfg.Path and serves it in the background until
// Close. If an older holder answers on the path, Start first copies every
// entry from it and then takes the path over (see the package
// documentation); a stale socket file nothing answers on is replaced; any
// other file at the path, or something there that does not speak this
// protocol, is an error and left alone.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Path == "" {
		cfg.Path = DefaultPath
	}
	if cfg.MaxFDs <= 0 {
		cfg.MaxFDs = DefaultMaxFDs
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.TakeoverTimeout <= 0 {
		cfg.TakeoverTimeout = DefaultTakeoverTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{
		cfg:      cfg,
		log:      cfg.Logger.With("component", "fdstore", "path", cfg.Path),
		uid:      os.Geteuid(),
		lockPath: cfg.Path + ".lock",
		entries:  make(map[string]int),
		conns:    make(map[*serverConn]struct{}),
		done:     make(chan struct{}),
	}
	var id [8]byte
	rand.Read(id[:])
	s.self = HolderInfo{ID: hex.EncodeToString(id[:]), PID: os.Getpid(), Started: time.Now().UTC(), Path: cfg.Path, Version: ProtocolVersion}
	s.checkRlimit()

	dir := filepath.Dir(cfg.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("fdstore: create %s: %w", dir, err)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.TakeoverTimeout)
	defer cancel()
	unlock, err := lockFile(ctx, s.lockPath)
	if err != nil {
		return nil, fmt.Errorf("fdstore: take-over lock %s: %w", s.lockPath, err)
	}
	defer unlock()

	prev, prevInfo, err := s.findPredecessor(ctx)
	if err != nil {
		return nil, fmt.Errorf("fdstore: %w", err)
	}
	if prev != nil {
		defer prev.close()
		if err := s.copyFrom(ctx, prev, prevInfo); err != nil {
			s.closeEntries()
			return nil, fmt.Errorf("fdstore: take over from %s: %w", prevInfo, err)
		}
		if testHookBeforeRename != nil {
			testHookBeforeRename()
		}
	}
	ln, sid, err := bindAt(cfg.Path)
	if err != nil {
		s.closeEntries()
		return nil, fmt.Errorf("fdstore: %w", err)
	}
	s.mu.Lock()
	s.sockID = sid
	s.mu.Unlock()
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.serve(ln)
	if prev != nil {
		self := s.Info()
		err := prev.roundTrip(ctx, &request{Op: opSuperseded, Holder: &self}, nil, func(_ *reply, fds []int) error {
			closeFDs(fds)
			return nil
		})
		if err != nil {
			// The path is ours already; the old holder notices the lost
			// lease and redirects its clients (or it is gone).
			s.log.Warn("telling the old holder it is superseded", "old", prevInfo.String(), "err", err)
		}
		s.log.Info("took over from the old holder", "old", prevInfo.String(), "entries", s.Len())
	} else {
		s.log.Info("holding fds", "holder", s.self.ID, "max_fds", cfg.MaxFDs)
	}
	return s, nil
}

// testHookBeforeRename runs inside a take-over, between the copy and the
// rename (tests only).
var testHookBeforeRename func()

// checkRlimit makes room for MaxFDs held fds plus those in flight.
func (s *Server) checkRlimit() {
	// Held fds, their dups in flight (a frame's worth), connections.
	need := uint64(s.cfg.MaxFDs) + uint64(s.cfg.MaxConns) + 1024
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return
	}
	if rl.Cur >= need {
		return
	}
	if rl.Max > rl.Cur {
		rl.Cur = min(need, rl.Max)
		unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)
	}
	if rl.Cur < need {
		s.log.Warn("RLIMIT_NOFILE is below what MaxFDs needs: puts may fail with truncated fds", "nofile", rl.Cur, "need", need)
	}
}

// findPredecessor connects to an older holder at the path and asks it to
// freeze for a take-over. It returns nil if nothing answers there.
func (s *Server) findPredecessor(ctx context.Context) (*rawConn, *HolderInfo, error) {
	path := s.cfg.Path
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return nil, nil, fmt.Errorf("%s exists and is not a socket (%s); not replacing it", path, fi.Mode().Type())
	}
	dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	rc, err := dialRaw(dctx, path)
	if errors.Is(err, syscall.ECONNREFUSED) {
		s.log.Info("replacing a stale socket nothing answers on")
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("connect to the holder at %s: %w", path, err)
	}
	info, err := rc.hello(dctx)
	if err != nil {
		rc.close()
		return nil, nil, fmt.Errorf("%s answers but not as a holder: %w", path, err)
	}
	self := s.self
	err = rc.roundTrip(ctx, &request{Op: opTakeover, Holder: &self}, nil, func(_ *reply, fds []int) error {
		closeFDs(fds)
		return nil
	})
	if err != nil {
		rc.close()
		return nil, nil, fmt.Errorf("freeze %s for take-over: %w", info, err)
	}
	s.log.Info("an older holder answers; copying its fds", "old", info.String(), "entries", info.Entries)
	return rc, info, nil
}

// copyFrom copies every entry of the frozen older holder.
func (s *Server) copyFrom(ctx context.Context, rc *rawConn, from *HolderInfo) error {
	return rc.roundTrip(ctx, &request{Op: opGetPrefix}, nil, func(r *reply, fds []int) error {
		if len(r.Keys) != len(fds) {
			closeFDs(fds)
			return fmt.Errorf("protocol error: %d keys for %d fds", len(r.Keys), len(fds))
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for i, k := range r.Keys {
			if old, ok := s.entries[k]; ok {
				unix.Close(old)
			} else if len(s.entries) >= s.cfg.MaxFDs {
				closeFDs(fds[i:])
				return fmt.Errorf("%s holds more than MaxFDs (%d)", from, s.cfg.MaxFDs)
			}
			s.entries[k] = fds[i]
		}
		return nil
	})
}

// bindAt binds a socket at a temporary name beside path and renames it over
// path, so that path never lacks a socket that answers.
func bindAt(path string) (*net.UnixListener, fileID, error) {
	var r [6]byte
	rand.Read(r[:])
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.%x", filepath.Base(path), os.Getpid(), r))
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fileID{}, fmt.Errorf("listen: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (*net.UnixListener, fileID, error) {
		ln.Close()
		os.Remove(tmp)
		return nil, fileID{}, err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(err)
	}
	id, err := statID(tmp)
	if err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("rename the socket onto %s: %w", path, err))
	}
	return ln, id, nil
}

// serve accepts on ln until Close.
func (s *Server) serve(ln *net.UnixListener) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return
	}
	s.listeners = append(s.listeners, ln)
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		var backoff time.Duration
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept (retrying)", "err", err, "retry_in", backoff.String())
				select {
				case <-time.After(backoff):
				case <-s.done:
					return
				}
				continue
			}
			backoff = 0
			s.accept(c)
		}
	}()
}

func (s *Server) accept(c *net.UnixConn) {
	sc := &serverConn{s: s, fc: newFrameConn(c, MaxRequestSize)}
	cred, err := peerCred(c)
	if err != nil {
		s.log.Warn("peer credentials (closing)", "err", err)
		c.Close()
		return
	}
	sc.peer = cred
	log := s.log.With("peer_pid", cred.Pid, "peer_uid", cred.Uid)
	if int(cred.Uid) != s.uid {
		// The reply says why; it is written before anything is read.
		log.Warn("refusing a peer with another UID", "uid", s.uid)
		sc.refuse(codeForbidden, fmt.Sprintf("peer uid %d is not the holder's uid %d", cred.Uid, s.uid))
		return
	}
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		sc.refuse(codeClosing, "holder closing")
		return
	case len(s.conns) >= s.cfg.MaxConns:
		s.mu.Unlock()
		log.Warn("refusing a connection: too many", "max_conns", s.cfg.MaxConns)
		sc.refuse(codeBusy, fmt.Sprintf("holder has its maximum of %d connections", s.cfg.MaxConns))
		return
	}
	s.nextConn++
	sc.id = s.nextConn
	sc.log = log.With("conn", sc.id)
	s.conns[sc] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	sc.log.Debug("client connected")
	go sc.serve()
}

func peerCred(c *net.UnixConn) (unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return unix.Ucred{}, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return unix.Ucred{}, err
	}
	if cerr != nil {
		return unix.Ucred{}, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return *cred, nil
}

// Info describes this holder now.
func (s *Server) Info() HolderInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.infoLocked()
}

func (s *Server) infoLocked() HolderInfo {
	h := s.self
	h.Entries = len(s.entries)
	h.SupersededBy = s.superseded
	h.TakeoverBy = s.leaseBy
	return h
}

// Len is the number of fds held.
func (s *Server) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// SupersededBy returns the holder that took this one's place, if any.
func (s *Server) SupersededBy() (HolderInfo, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.superseded == nil {
		return HolderInfo{}, false
	}
	return *s.superseded, true
}

// Close stops the holder: it stops accepting, closes every client
// connection and every fd it holds, and removes the socket file if the path
// is still this holder's (never a successor's).
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		close(s.done)
		s.cancel()
		lns := s.listeners
		conns := make([]*serverConn, 0, len(s.conns))
		for sc := range s.conns {
			conns = append(conns, sc)
		}
		s.mu.Unlock()
		for _, ln := range lns {
			ln.Close()
		}
		for _, sc := range conns {
			sc.fc.c.Close()
		}
		s.wg.Wait()
		n := s.Len()
		s.closeEntries()
		s.removeOwnSocket()
		s.log.Info("stopped; closed the held fds", "entries", n)
	})
	return nil
}

func (s *Server) closeEntries() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, fd := range s.entries {
		unix.Close(fd)
		delete(s.entries, k)
	}
}

// removeOwnSocket unlinks the path if it is still the socket this holder
// bound, under the take-over lock so that no successor renames in between.
func (s *Server) removeOwnSocket() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	unlock, err := lockFile(ctx, s.lockPath)
	if err != nil {
		s.log.Debug("socket file left in place (take-over lock busy)", "err", err)
		return
	}
	defer unlock()
	if s.pathIsOurs() {
		os.Remove(s.cfg.Path)
	}
}

func (s *Server) pathIsOurs() bool {
	id, err := statID(s.cfg.Path)
	s.mu.Lock()
	defer s.mu.Unlock()
	return err == nil && id == s.sockID
}

// leaseLost runs when the connection of a take-over in progress closes
// before it said "superseded": the newer holder died or gave up. If it
// never renamed its socket onto the path, this holder carries on; if the
// path is someone else's and answers, this holder is superseded by it; if
// the path is someone else's and dead, this holder takes the path back.
// This holder refused every change while frozen, so in each case no change
// is lost.
func (s *Server) leaseLost(by *HolderInfo) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.TakeoverTimeout)
	defer cancel()
	unlock, err := lockFile(ctx, s.lockPath)
	if err != nil {
		s.log.Error("take-over abandoned, but the take-over lock is busy: serving on", "by", by.String(), "err", err)
		s.unfreeze(nil)
		return
	}
	defer unlock()
	if s.pathIsOurs() {
		s.log.Warn("take-over abandoned before it took the path; serving on", "by", by.String())
		s.unfreeze(nil)
		return
	}
	dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
	defer dcancel()
	if rc, err := dialRaw(dctx, s.cfg.Path); err == nil {
		info, herr := rc.hello(dctx)
		rc.close()
		if herr == nil {
			s.log.Warn("take-over connection lost after the path moved; superseded", "by", info.String())
			s.unfreeze(info)
			return
		}
	}
	ln, sid, err := bindAt(s.cfg.Path)
	if err != nil {
		s.log.Error("take-over abandoned after the path moved; cannot take the path back: clients cannot reach this holder", "by", by.String(), "err", err)
		s.unfreeze(nil)
		return
	}
	s.mu.Lock()
	s.sockID = sid
	s.mu.Unlock()
	s.serve(ln)
	s.log.Warn("take-over abandoned after the path moved and its holder is gone; took the path back", "by", by.String())
	s.unfreeze(nil)
}

// unfreeze ends a take-over; superseded is the holder now at the path, if any.
func (s *Server) unfreeze(superseded *HolderInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.leaseBy = nil
	if superseded != nil {
		s.superseded = superseded
	}
}

// serverConn is one client connection of a Server.
type serverConn struct {
	s    *Server
	fc   *frameConn
	peer unix.Ucred
	id   uint64
	log  *slog.Logger
}

// refuse answers an unaccepted connection with an error and closes it.
func (sc *serverConn) refuse(code, msg string) {
	sc.fc.c.SetWriteDeadline(time.Now().Add(time.Second))
	sc.fc.writeFrame(&reply{Code: code, Error: "fdstore: " + msg}, nil)
	sc.fc.close()
}

func (sc *serverConn) serve() {
	s := sc.s
	defer s.wg.Done()
	defer func() {
		sc.fc.close()
		s.mu.Lock()
		delete(s.conns, sc)
		lost := s.lease == sc
		by := s.leaseBy
		if lost {
			s.lease = nil
		}
		closed := s.closed
		s.mu.Unlock()
		sc.log.Debug("client gone")
		if lost && !closed {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.leaseLost(by)
			}()
		}
	}()
	for {
		f, err := sc.fc.readFrame()
		if err != nil {
			var tl *frameTooLargeError
			switch {
			case errors.As(err, &tl):
				sc.log.Warn("message too large (closing the connection)", "err", err)
				sc.write(&reply{Code: codeTooLarge, Error: "fdstore: " + err.Error()}, nil)
			case errors.Is(err, errTooManyFDs):
				sc.log.Warn("closing the connection", "err", err)
				sc.write(&reply{Code: codeBadRequest, Error: "fdstore: " + err.Error()}, nil)
			case errors.Is(err, errEOF), errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
			default:
				sc.log.Debug("read", "err", err)
			}
			return
		}
		if err := sc.handle(f); err != nil {
			sc.log.Debug("write reply (closing the connection)", "err", err)
			return
		}
	}
}

func (sc *serverConn) write(r *reply, fds []int) error {
	r.FDs = len(fds)
	sc.fc.c.SetWriteDeadline(time.Now().Add(replyTimeout))
	return sc.fc.writeFrame(r, fds)
}

func (sc *serverConn) fail(code, format string, args ...any) error {
	return sc.write(&reply{Code: code, Error: "fdstore: " + fmt.Sprintf(format, args...)}, nil)
}

func validKey(k string) error {
	switch {
	case k == "":
		return errors.New("empty key")
	case len(k) > MaxKeyLen:
		return fmt.Errorf("key of %d bytes exceeds %d", len(k), MaxKeyLen)
	case !utf8.ValidString(k):
		return errors.New("key is not UTF-8")
	case strings.IndexFunc(k, unicode.IsControl) >= 0:
		return errors.New("key contains a control character")
	}
	return nil
}

// handle answers one request. It returns an error only when the reply
// could not be written (the connection is then closed).
func (sc *serverConn) handle(f frame) error {
	var req request
	if err := json.Unmarshal(f.body, &req); err != nil {
		closeFDs(f.fds)
		sc.log.Warn("bad request", "err", err)
		return sc.fail(codeBadRequest, "cannot parse request: %v", err)
	}
	if f.truncated || len(f.fds) != req.FDs {
		closeFDs(f.fds)
		sc.log.Warn("bad request: fds do not match", "op", req.Op, "claimed", req.FDs, "carried", len(f.fds), "truncated", f.truncated)
		return sc.fail(codeBadRequest, "%s: message claims %d fds, carried %d (truncated: %v)", req.Op, req.FDs, len(f.fds), f.truncated)
	}
	if req.Op != opPut && len(f.fds) > 0 {
		closeFDs(f.fds)
		return sc.fail(codeBadRequest, "%s carries no fds", req.Op)
	}
	switch req.Op {
	case opHello:
		info := sc.s.Info()
		return sc.write(&reply{OK: true, Holder: &info}, nil)
	case opPut:
		return sc.put(req.Key, f.fds)
	case opGet:
		return sc.get(req.Key)
	case opGetPrefix:
		return sc.getPrefix(req.Prefix)
	case opDelete, opDeletePrefix:
		return sc.delete(req.Op, req.Key, req.Prefix)
	case opList:
		return sc.list(req.Prefix)
	case opTakeover:
		return sc.takeover(req.Holder)
	case opSuperseded:
		return sc.supersede(req.Holder)
	default:
		sc.log.Warn("bad request: unknown op", "op", req.Op)
		return sc.fail(codeBadRequest, "unknown op %q", req.Op)
	}
}

// refusal tells why the holder takes no change (or no read) now, if it does not.
func (sc *serverConn) refusal(mutate bool) *reply {
	s := sc.s
	switch {
	case s.closed:
		return &reply{Code: codeClosing, Error: "fdstore: holder closing"}
	case s.superseded != nil:
		return &reply{Code: codeSuperseded, Holder: s.superseded,
			Error: fmt.Sprintf("fdstore: superseded by %s: talk to the path again", s.superseded)}
	case mutate && s.leaseBy != nil && s.lease != sc:
		return &reply{Code: codeTakeover, Holder: s.leaseBy,
			Error: fmt.Sprintf("fdstore: %s is taking this holder over: retry at the path", s.leaseBy)}
	}
	return nil
}

func (sc *serverConn) put(key string, fds []int) error {
	if err := validKey(key); err != nil {
		closeFDs(fds)
		return sc.fail(codeBadRequest, "put: %v", err)
	}
	if len(fds) != 1 {
		closeFDs(fds)
		return sc.fail(codeBadRequest, "put %s: carries %d fds, want 1", key, len(fds))
	}
	fd := fds[0]
	if _, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		unix.Close(fd)
		sc.log.Warn("bad request: put of a non-socket", "key", key, "err", err)
		return sc.fail(codeBadRequest, "put %s: not a socket: %v", key, err)
	}
	s := sc.s
	s.mu.Lock()
	if r := sc.refusal(true); r != nil {
		s.mu.Unlock()
		unix.Close(fd)
		return sc.write(r, nil)
	}
	old, replaced := s.entries[key]
	if !replaced && len(s.entries) >= s.cfg.MaxFDs {
		s.mu.Unlock()
		unix.Close(fd)
		sc.log.Warn("put refused: holder full", "key", key, "max_fds", s.cfg.MaxFDs)
		return sc.fail(codeFull, "put %s: holder keeps its maximum of %d fds", key, s.cfg.MaxFDs)
	}
	s.entries[key] = fd
	s.mu.Unlock()
	if replaced {
		unix.Close(old)
	}
	sc.log.Debug("put", "key", key, "replaced", replaced)
	return sc.write(&reply{OK: true}, nil)
}

// dupLocked duplicates the held fd of key (the original may be closed by a
// concurrent delete while the copy is in flight).
func (s *Server) dupLocked(key string) (int, bool, error) {
	fd, ok := s.entries[key]
	if !ok {
		return -1, false, nil
	}
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	return d, true, err
}

func (sc *serverConn) get(key string) error {
	s := sc.s
	s.mu.Lock()
	if r := sc.refusal(false); r != nil {
		s.mu.Unlock()
		return sc.write(r, nil)
	}
	d, ok, err := s.dupLocked(key)
	s.mu.Unlock()
	switch {
	case !ok:
		return sc.fail(codeNotFound, "get %s: not found", key)
	case err != nil:
		return sc.fail(codeBusy, "get %s: dup: %v", key, err)
	}
	defer unix.Close(d)
	return sc.write(&reply{OK: true, Keys: []string{key}}, []int{d})
}

// keysLocked returns the held keys with prefix, sorted.
func (s *Server) keysLocked(prefix string) []string {
	var keys []string
	for k := range s.entries {
		if strings.HasPrefix(k, prefix) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

func (sc *serverConn) getPrefix(prefix string) error {
	s := sc.s
	s.mu.Lock()
	if r := sc.refusal(false); r != nil {
		s.mu.Unlock()
		return sc.write(r, nil)
	}
	keys := s.keysLocked(prefix)
	s.mu.Unlock()
	for {
		// Duplicate a chunk at a time: the copies in flight stay bounded.
		var sent []string
		var fds []int
		s.mu.Lock()
		for len(keys) > 0 && len(fds) < MaxFDsPerFrame {
			k := keys[0]
			keys = keys[1:]
			d, ok, err := s.dupLocked(k)
			if !ok {
				continue // deleted meanwhile
			}
			if err != nil {
				s.mu.Unlock()
				closeFDs(fds)
				return sc.fail(codeBusy, "get_prefix %s: dup: %v", prefix, err)
			}
			sent = append(sent, k)
			fds = append(fds, d)
		}
		s.mu.Unlock()
		err := sc.write(&reply{OK: true, Keys: sent, More: len(keys) > 0}, fds)
		closeFDs(fds)
		if err != nil || len(keys) == 0 {
			return err
		}
	}
}

func (sc *serverConn) delete(op, key, prefix string) error {
	s := sc.s
	if op == opDelete {
		if err := validKey(key); err != nil {
			return sc.fail(codeBadRequest, "delete: %v", err)
		}
	}
	s.mu.Lock()
	if r := sc.refusal(true); r != nil {
		s.mu.Unlock()
		return sc.write(r, nil)
	}
	var closing []int
	var keys []string
	if op == opDelete {
		if fd, ok := s.entries[key]; ok {
			keys = []string{key}
			closing = append(closing, fd)
		}
	} else {
		keys = s.keysLocked(prefix)
		for _, k := range keys {
			closing = append(closing, s.entries[k])
		}
	}
	for _, k := range keys {
		delete(s.entries, k)
	}
	s.mu.Unlock()
	closeFDs(closing)
	sc.log.Debug(op, "key", key, "prefix", prefix, "count", len(keys))
	return sc.write(&reply{OK: true, Count: len(keys)}, nil)
}

func (sc *serverConn) list(prefix string) error {
	s := sc.s
	s.mu.Lock()
	if r := sc.refusal(false); r != nil {
		s.mu.Unlock()
		return sc.write(r, nil)
	}
	keys := s.keysLocked(prefix)
	s.mu.Unlock()
	for {
		n, size := 0, 0
		for n < len(keys) && (n == 0 || size+len(keys[n]) <= listChunkBytes) {
			size += len(keys[n]) + 3
			n++
		}
		if err := sc.write(&reply{OK: true, Keys: keys[:n], More: n < len(keys)}, nil); err != nil || n == len(keys) {
			return err
		}
		keys = keys[n:]
	}
}

// takeover freezes this holder for a newer one, until that one's
// connection says "superseded" or closes.
func (sc *serverConn) takeover(by *HolderInfo) error {
	if by == nil || by.ID == "" {
		return sc.fail(codeBadRequest, "takeover names no holder")
	}
	s := sc.s
	s.mu.Lock()
	if r := sc.refusal(false); r != nil {
		s.mu.Unlock()
		return sc.write(r, nil)
	}
	if s.leaseBy != nil {
		r := &reply{Code: codeTakeover, Holder: s.leaseBy, Error: fmt.Sprintf("fdstore: %s is taking this holder over already", s.leaseBy)}
		s.mu.Unlock()
		return sc.write(r, nil)
	}
	s.lease, s.leaseBy = sc, by
	info := s.infoLocked()
	s.mu.Unlock()
	sc.log.Info("frozen for a take-over: changes refused until it ends", "by", by.String(), "entries", info.Entries)
	return sc.write(&reply{OK: true, Holder: &info}, nil)
}

// supersede ends a take-over: the newer holder has the path now.
func (sc *serverConn) supersede(by *HolderInfo) error {
	s := sc.s
	s.mu.Lock()
	if s.lease != sc || by == nil || by.ID != s.leaseBy.ID {
		s.mu.Unlock()
		return sc.fail(codeBadRequest, "superseded without a take-over by that holder on this connection")
	}
	s.lease, s.leaseBy, s.superseded = nil, nil, by
	n := len(s.entries)
	s.mu.Unlock()
	sc.log.Info("superseded: keeping the fds until stopped, refusing requests", "by", by.String(), "entries", n)
	return sc.write(&reply{OK: true}, nil)
}

// lockFile takes an exclusive flock on path, polling until ctx ends. The
// kernel drops the lock when the process dies.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() {
				unix.Flock(fd, unix.LOCK_UN)
				unix.Close(fd)
			}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			unix.Close(fd)
			return nil, err
		}
		if err := sleepCtx(ctx, backoff(attempt)); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
}

// backoff is the wait before retry attempt+1: 10 ms doubling to 500 ms.
func backoff(attempt int) time.Duration {
	return min(10*time.Millisecond<<min(attempt, 6), 500*time.Millisecond)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
