package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/pkg/handover"
)

// The node agent's side of a restart (package handover): its HTTP ports are
// shared with a successor (SO_REUSEPORT) and closed when one says hello; on
// SIGTERM it keeps accepting until a successor serves every pod, or until
// --handover-timeout; then it stops accepting and drains.

// httpServers are the metrics, readiness and admin servers, which a
// successor takes over.
type httpServers struct {
	mu      sync.Mutex
	servers []*http.Server
}

func (h *httpServers) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.servers {
		s.Close()
	}
	h.servers = nil
}

func (h *httpServers) open() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.servers) > 0
}

// reusePort lets a successor bind the same HTTP ports while this agent runs.
func reusePort(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	return serr
}

// listenHTTP binds the metrics, readiness and admin servers before anything
// serves, so a port in use stops startup with a clear error. The ports are
// SO_REUSEPORT: an agent and its successor bind them side by side.
func (a *agent) listenHTTP() error {
	specs := []struct {
		name, flag, addr string
		handler          http.Handler
	}{
		{"metrics", "metrics-addr", a.opts.metricsAddr, a.metricsHandler()},
		{"readiness", "ready-addr", a.opts.readyAddr, a.readyHandler()},
		{"admin", "admin-addr", a.opts.adminAddr, a.adminHandler()},
	}
	lc := net.ListenConfig{Control: reusePort}
	var servers []*http.Server
	for _, s := range specs {
		ln, err := lc.Listen(context.Background(), "tcp", s.addr)
		if err != nil {
			for _, srv := range servers {
				srv.Close()
			}
			return fmt.Errorf("%s server on %s: %w (a process other than a warren agent holds the port? set --%s)", s.name, s.addr, err, s.flag)
		}
		srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, srv)
		go srv.Serve(ln)
	}
	a.http.mu.Lock()
	a.http.servers = servers
	a.http.mu.Unlock()
	return nil
}

// startHandover listens for successors and tells predecessors this agent
// is here. It returns a function that stops both.
func (a *agent) startHandover(ctx context.Context) (stop func(), err error) {
	dir := a.opts.stateDir
	pid := os.Getpid()
	var terminating atomic.Bool
	a.terminating = &terminating
	srv, err := handover.Listen(dir, pid, handover.Events{
		Hello: func(succ int) {
			// Probes and scrapes go to the newest agent from now on.
			a.log.Info("successor agent bound its ports: closing this agent's metrics, readiness and admin servers", "successor_pid", succ)
			a.http.close()
		},
		Gone: func(succ int) {
			if terminating.Load() || a.http.open() {
				return
			}
			a.log.Warn("successor agent went away: serving metrics, readiness and admin again", "successor_pid", succ)
			if err := a.listenHTTP(); err != nil {
				a.log.Error("re-open HTTP servers", "err", err)
			}
		},
	}, a.log)
	if err != nil {
		return nil, fmt.Errorf("%w (set --state-dir to a writable directory)", err)
	}
	a.handover = srv
	ann := handover.NewAnnouncer(dir, pid, a.log)
	preds, err := ann.Hello(ctx)
	if err != nil {
		a.log.Warn("look for a predecessor agent", "err", err)
	}
	if len(preds) > 0 {
		a.log.Info("taking over from running agent(s)", "pids", preds)
	}
	done := make(chan struct{})
	go func() {
		// Tell predecessors once this agent serves every pod it knows.
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				if a.proxy.Ready() == nil {
					ann.Ready(len(a.store.Current().EnrolledWorkloads()))
				}
			}
		}
	}()
	return func() {
		close(done)
		ann.Close()
		srv.Close()
	}, nil
}

// awaitSuccessor runs on SIGTERM: it returns once a successor serves every
// pod (handed true), or after --handover-timeout, and says which.
func (a *agent) awaitSuccessor() (why string, handed bool) {
	a.terminating.Store(true)
	if pid, pods, ok := a.handover.Successor(); ok {
		return fmt.Sprintf("handed over to agent pid %d (serving %d pods)", pid, pods), true
	}
	if a.opts.handoverTimeout <= 0 {
		return "no successor (--handover-timeout 0)", false
	}
	a.log.Info("SIGTERM: still accepting until a successor agent serves every pod", "handover_timeout", a.opts.handoverTimeout.String(), "socket", a.handover.Path())
	t := time.NewTimer(a.opts.handoverTimeout)
	defer t.Stop()
	select {
	case <-a.handover.SuccessorReady():
		pid, pods, _ := a.handover.Successor()
		return fmt.Sprintf("handed over to agent pid %d (serving %d pods)", pid, pods), true
	case <-t.C:
		return fmt.Sprintf("no successor within --handover-timeout %s", a.opts.handoverTimeout), false
	}
}

// stoppedReason is readiness's answer once the agent stopped accepting.
func (a *agent) stoppedReason() error {
	if s := a.stopped.Load(); s != nil {
		return errors.New("stopped accepting new connections: " + *s + "; draining open connections")
	}
	return nil
}
