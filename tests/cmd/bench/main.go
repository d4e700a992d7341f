// Command bench runs warren's benchmark harness (tests/bench) on the lab and
// prints the table of ratios: warren against direct TCP and against two
// classic mTLS tunnel pairs (stunnel4 and HAProxy), across nodes and on one
// node, with the spread over the runs and issue 15's targets.
//
//	sudo go run ./tests/cmd/bench -json bench.json -md bench.md   # full run, < 15 min on 2 cores
//	sudo go run ./tests/cmd/bench -short                          # short mode, < 2 min
//
// It needs root (network namespaces, BPF), stunnel4 and haproxy (make deps).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/warren-mesh/warren/tests/bench"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	short := flag.Bool("short", false, "short mode: one run, short durations, 500 idle connections")
	jsonOut := flag.String("json", "", "write the JSON report to this file")
	mdOut := flag.String("md", "", "write the markdown table to this file")
	runs := flag.Int("runs", 0, "runs per scenario and path (default 5, short 1)")
	scenarios := flag.String("scenarios", "", "comma-separated scenarios (default all: "+strings.Join(bench.Scenarios, ",")+")")
	paths := flag.String("paths", "", "comma-separated paths (default all: "+strings.Join(bench.Paths, ",")+"; also "+strings.Join(bench.ExtraPaths, ",")+", warren_same_node with the agents restarted with --same-node-fast-path on or off)")
	idle := flag.Int("idle", 0, "idle connections held through warren (default 10000, short 500)")
	profile := flag.String("profile", "", "write agent CPU/heap profiles from an extra unmeasured pass into this directory")
	bulkD := flag.Duration("bulk", 0, "length of a bulk transfer (default 4s, short 1s)")
	loadD := flag.Duration("load", 0, "length of the fixed-rate request/response run (default 10s, short 2s)")
	shortD := flag.Duration("conns-d", 0, "length of the new-connection and CPU runs (default 4s, short 1s)")
	agentEnv := flag.String("agent-env", "", "comma-separated KEY=VALUE environment for the agents (experiments, e.g. GOMAXPROCS=1)")
	waitLoad := flag.Float64("wait-load", 0, "wait until the 1-minute load average is below this before starting (and call the run quiet only if it was)")
	waitMax := flag.Duration("wait-load-timeout", 10*time.Minute, "how long -wait-load waits; after it the run starts anyway and the report says it is not a quiet-machine run")
	flag.Parse()
	if os.Geteuid() != 0 {
		return errors.New("needs root: run it with sudo (network namespaces, BPF)")
	}
	opts := bench.Options{QuietLoad: *waitLoad, Runs: *runs, Idle: *idle, ProfileDir: *profile, Log: os.Stderr, Bulk: *bulkD, Load: *loadD, Short: *shortD}
	if *scenarios != "" {
		opts.Scenarios = strings.Split(*scenarios, ",")
	}
	if *agentEnv != "" {
		opts.AgentEnv = strings.Split(*agentEnv, ",")
	}
	if *paths != "" {
		opts.Paths = strings.Split(*paths, ",")
	}
	if *waitLoad > 0 {
		waitForLoad(*waitLoad, *waitMax)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep, err := bench.Run(ctx, opts, *short)
	if err != nil {
		return err
	}
	md := bench.Markdown(rep)
	fmt.Println(md)
	if *jsonOut != "" {
		b, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	if *mdOut != "" {
		if err := os.WriteFile(*mdOut, []byte(md), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// waitForLoad waits until the 1-minute load average drops below limit, at
// most max, and says on stderr what it waited for and how it ended.
func waitForLoad(limit float64, max time.Duration) {
	start := time.Now()
	deadline := start.Add(max)
	for {
		l, err := load1()
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: cannot read the load average (%v); not waiting\n", err)
			return
		}
		if l < limit {
			if time.Since(start) > time.Second {
				fmt.Fprintf(os.Stderr, "bench: load %.2f < %.2f after %s: starting\n", l, limit, time.Since(start).Round(time.Second))
			}
			return
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "bench: THE MACHINE DID NOT GET QUIET: load %.2f is still >= %.2f after waiting %s; running anyway, "+
				"and the report is labelled as not a quiet-machine run (its figures are not comparable with a quiet run's)\n", l, limit, max)
			return
		}
		fmt.Fprintf(os.Stderr, "bench: load %.2f >= %.2f, waiting for a quiet machine (%s left)\n", l, limit, time.Until(deadline).Round(time.Second))
		time.Sleep(15 * time.Second)
	}
}

// load1 reads the 1-minute load average.
func load1() (float64, error) {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0, err
	}
	var l float64
	if _, err := fmt.Sscan(string(b), &l); err != nil {
		return 0, fmt.Errorf("parse /proc/loadavg: %w", err)
	}
	return l, nil
}
