package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/warren-mesh/warren/pkg/fdstore"
)

// The listener holder: `nodeagent fdstore` keeps a copy of every pod's
// listening sockets so that they outlive a crashed agent (package fdstore).
// In the chart it is a second container of the agent's pod; on a host
// without Kubernetes, a service of its own.

func newFDStoreCmd() *cobra.Command {
	var stateDir, path string
	cmd := &cobra.Command{
		Use:   "fdstore",
		Short: "Hold the pods' listening sockets so that connects wait, not fail, while no agent runs",
		Long: `Run the listener holder. Every node agent hands it a copy of each pod's
listening sockets (15001, 15006, 15008). While no agent runs — after a crash,
between kill -9 and the next start — the sockets stay in LISTEN: the kernel
completes connects into their accept queues, and the next agent takes the
same sockets back and accepts them, so clients see a delay instead of a
refusal. A second holder started on the same path takes the sockets over
from the first (a rolling update). It serves only processes of its own user.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			if path == "" {
				path = filepath.Join(stateDir, "fdstore.sock")
			}
			log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			srv, err := fdstore.Start(ctx, fdstore.Config{Path: path, Logger: log})
			if err != nil {
				return fmt.Errorf("start the listener holder on %s: %w", path, err)
			}
			log.Info("listener holder running", "path", path, "id", srv.Info().ID)
			<-ctx.Done()
			log.Info("listener holder stopping", "held", srv.Len())
			return srv.Close()
		},
	}
	f := cmd.Flags()
	f.StringVar(&stateDir, "state-dir", defaultStateDir, "directory of the holder's socket (the agents' --state-dir)")
	f.StringVar(&path, "path", "", "unix socket path (default: <state-dir>/fdstore.sock)")
	documentEnv(f)
	return cmd
}

// fdStorePath is the holder socket the agent uses, "" for none.
func (o *runOptions) fdStorePath() string {
	switch o.fdStore {
	case "none":
		return ""
	case "":
		return filepath.Join(o.stateDir, "fdstore.sock")
	}
	return o.fdStore
}

// connectFDStore dials the listener holder. Without one the agent runs, but
// a crash of it refuses connects until the next agent starts: it says so.
func (a *agent) connectFDStore(ctx context.Context) *fdstore.ListenerStore {
	path := a.opts.fdStorePath()
	if path == "" {
		a.log.Info("no listener holder (--fd-store none): a crash of this agent refuses connects until the next one starts")
		return nil
	}
	// The holder may be starting beside the agent (its sidecar): retry briefly.
	var c *fdstore.Client
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err = fdstore.Dial(dctx, path)
		cancel()
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		a.log.Warn("no listener holder: a crash of this agent would refuse connects until the next one starts (run nodeagent fdstore, or --fd-store none to silence this)",
			"path", path, "err", err)
		return nil
	}
	a.log.Info("listener holder connected: pod listeners outlive this process", "path", path)
	return &fdstore.ListenerStore{Client: c, Timeout: 2 * time.Second}
}

// watchFDStore hands every listener to the holder again when the holder
// changed (a new holder process may not have the old one's sockets).
func (a *agent) watchFDStore(ctx context.Context, st *fdstore.ListenerStore) {
	var last string
	if h := st.Client.Holder(); h != nil {
		last = h.ID
	}
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
		h, err := st.Client.Info(ictx)
		cancel()
		if err != nil {
			if !errors.Is(err, context.Canceled) {
				a.log.Debug("listener holder unreachable", "err", err)
			}
			continue
		}
		if h.ID == last {
			continue
		}
		n, err := a.proxy.KeepListeners()
		if err != nil {
			a.log.Warn("hand listeners to the new listener holder", "err", err)
			continue
		}
		a.log.Info("listener holder changed: listeners handed over again", "holder_pid", h.PID, "listeners", n)
		last = h.ID
	}
}
