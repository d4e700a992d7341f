// Package handover lets a new node agent take over from the one it
// replaces without a refused connect: the old agent keeps accepting until
// its successor says it serves every pod, and only then stops.
//
// # Protocol
//
// Every agent listens on a unix stream socket "agent-<pid>.sock" in the
// state directory (by default /var/run/warren, a host path shared by the
// DaemonSet's pods). A new agent, once it has bound its own ports, connects
// to every other agent-*.sock it finds there and sends newline-delimited
// JSON messages:
//
//	{"op":"hello","pid":123}            I am here; my admin, metrics and
//	                                    readiness ports are bound
//	{"op":"ready","pid":123,"pods":7}   I serve every local pod I know (my
//	                                    readiness is 200); sent again when
//	                                    the count changes
//
// The old agent (the predecessor) answers nothing; the connection stays open
// as long as the successor lives, and a closed connection withdraws the
// successor. On "hello" the predecessor closes its own admin, metrics and
// readiness listeners, so that probes and scrapes reach the newest agent.
// On SIGTERM the predecessor waits for a ready successor (or for the end of
// its grace period), then stops accepting on its pods' listeners, turns its
// readiness to 503 saying so, and drains its established connections.
//
// Both orders work: SIGTERM first and a successor later (a rolling update
// with maxUnavailable), or a successor first and SIGTERM later (maxSurge).
// While both run, both accept: on the same listening sockets when an fd
// holder shares them (package fdstore), or on SO_REUSEPORT siblings whose
// queued connects move to the survivor with tcp_migrate_req.
//
// Only processes of the same user may connect (the socket is 0600 in a
// 0700 directory). A message that cannot be parsed closes that connection.
package handover

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Message is one line of the protocol.
type Message struct {
	Op   string `json:"op"` // "hello" or "ready"
	PID  int    `json:"pid"`
	Pods int    `json:"pods,omitempty"`
}

// SocketPath is the control socket of the agent with pid in dir.
func SocketPath(dir string, pid int) string {
	return filepath.Join(dir, "agent-"+strconv.Itoa(pid)+".sock")
}

// Events are the predecessor's callbacks; each may be nil. They run on the
// connection's goroutine and must not block for long.
type Events struct {
	// Hello: a successor has bound its ports.
	Hello func(pid int)
	// Ready: a successor serves every local pod it knows.
	Ready func(pid, pods int)
	// Gone: a successor's connection closed.
	Gone func(pid int)
}

// Server is an agent's control socket: the predecessor side.
type Server struct {
	ln   *net.UnixListener
	path string
	ev   Events
	log  *slog.Logger

	mu     sync.Mutex
	ready  map[int]int // successor pid -> pods, while ready
	readyC chan struct{}
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// Listen creates dir (0700) if needed and listens on SocketPath(dir, pid).
// A stale socket of a dead process with the same pid is replaced.
func Listen(dir string, pid int, ev Events, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("handover: create state dir %s: %w", dir, err)
	}
	path := SocketPath(dir, pid)
	_ = os.Remove(path) // our own pid: whatever was there is stale
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("handover: listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("handover: chmod %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	s := &Server{ln: ln, path: path, ev: ev, log: log, ready: map[int]int{}, readyC: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// SuccessorReady is closed once some successor has reported ready.
func (s *Server) SuccessorReady() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readyC
}

// Successor returns a ready successor's pid and pod count, if any.
func (s *Server) Successor() (pid, pods int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for p, n := range s.ready {
		if !ok || p > pid {
			pid, pods, ok = p, n, true
		}
	}
	return pid, pods, ok
}

// Close stops listening, closes every successor connection and removes the socket.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go s.serve(c)
	}
}

// maxLine bounds one message.
const maxLine = 4096

func (s *Server) serve(c net.Conn) {
	defer s.wg.Done()
	pid := 0
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		_, wasReady := s.ready[pid]
		delete(s.ready, pid)
		if wasReady && len(s.ready) == 0 {
			s.readyC = make(chan struct{})
		}
		s.mu.Unlock()
		if pid != 0 {
			s.log.Info("successor agent gone", "pid", pid)
			if s.ev.Gone != nil {
				s.ev.Gone(pid)
			}
		}
	}()
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 0, 512), maxLine)
	for sc.Scan() {
		var m Message
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil || m.PID <= 0 || (pid != 0 && m.PID != pid) {
			s.log.Warn("handover: bad message, closing the connection", "line", truncate(sc.Text()), "err", err)
			return
		}
		pid = m.PID
		switch m.Op {
		case "hello":
			s.log.Info("successor agent started", "pid", pid)
			if s.ev.Hello != nil {
				s.ev.Hello(pid)
			}
		case "ready":
			s.mu.Lock()
			if len(s.ready) == 0 {
				close(s.readyC)
			}
			s.ready[pid] = m.Pods
			s.mu.Unlock()
			s.log.Info("successor agent ready", "pid", pid, "pods", m.Pods)
			if s.ev.Ready != nil {
				s.ev.Ready(pid, m.Pods)
			}
		default:
			s.log.Warn("handover: unknown op, closing the connection", "op", m.Op)
			return
		}
	}
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Announcer is the successor side: it tells every predecessor in dir.
type Announcer struct {
	dir string
	pid int
	log *slog.Logger

	mu    sync.Mutex
	peers map[string]net.Conn
	last  *Message
}

// NewAnnouncer returns an announcer for the agent pid.
func NewAnnouncer(dir string, pid int, log *slog.Logger) *Announcer {
	if log == nil {
		log = slog.Default()
	}
	return &Announcer{dir: dir, pid: pid, log: log, peers: map[string]net.Conn{}}
}

// Hello connects to every other agent socket in dir and says hello. It
// returns the predecessors' pids. Sockets nobody answers on are stale
// (their agent died) and are removed.
func (a *Announcer) Hello(ctx context.Context) ([]int, error) {
	paths, err := filepath.Glob(filepath.Join(a.dir, "agent-*.sock"))
	if err != nil {
		return nil, fmt.Errorf("handover: list %s: %w", a.dir, err)
	}
	own := SocketPath(a.dir, a.pid)
	var pids []int
	for _, p := range paths {
		if p == own {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(p), "agent-"), ".sock"))
		if err != nil {
			continue
		}
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := d.DialContext(dctx, "unix", p)
		cancel()
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				a.log.Info("removing the socket of an agent that is gone", "path", p)
				_ = os.Remove(p)
			}
			continue
		}
		a.mu.Lock()
		a.peers[p] = c
		a.mu.Unlock()
		if err := a.send(p, c, Message{Op: "hello", PID: a.pid}); err != nil {
			continue
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// Ready tells every predecessor that this agent serves pods local pods.
// Repeated calls with the same count send nothing.
func (a *Announcer) Ready(pods int) {
	m := Message{Op: "ready", PID: a.pid, Pods: pods}
	a.mu.Lock()
	if a.last != nil && *a.last == m {
		a.mu.Unlock()
		return
	}
	a.last = &m
	peers := make(map[string]net.Conn, len(a.peers))
	for p, c := range a.peers {
		peers[p] = c
	}
	a.mu.Unlock()
	for p, c := range peers {
		_ = a.send(p, c, m)
	}
}

func (a *Announcer) send(path string, c net.Conn, m Message) error {
	b, _ := json.Marshal(m)
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := c.Write(append(b, '\n')); err != nil {
		a.log.Debug("handover: predecessor gone", "path", path, "err", err)
		a.mu.Lock()
		delete(a.peers, path)
		a.mu.Unlock()
		c.Close()
		return err
	}
	return nil
}

// Close drops the connections to predecessors.
func (a *Announcer) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for p, c := range a.peers {
		c.Close()
		delete(a.peers, p)
	}
}
