// Command demo runs warren's demo on the lab: a two-node virtual cluster,
// traffic between its pods, and a short report. make demo runs it as root.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/warren-mesh/warren/tests/lab"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: run make demo (it uses sudo when you are not root)")
	}
	start := time.Now()
	dir, err := os.MkdirTemp("", "warren-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	app, err := lab.BuildApp(dir)
	if err != nil {
		return err
	}
	l, err := lab.New(lab.Config{})
	if err != nil {
		return err
	}
	defer func() {
		if err := l.Close(); err != nil {
			slog.Error("clean up lab", "err", err)
		}
		fmt.Printf("lab %s removed; demo took %s\n", l.Prefix(), time.Since(start).Round(time.Millisecond))
	}()

	type podSpec struct{ node, pod string }
	specs := []podSpec{{"node1", "client1"}, {"node1", "server1"}, {"node2", "client2"}, {"node2", "server2"}}
	pods := map[string]*lab.Pod{}
	for _, s := range specs {
		n := l.Node(s.node)
		if n == nil {
			if n, err = l.AddNode(s.node); err != nil {
				return err
			}
			fmt.Printf("node %-6s underlay %s, %s  pods %s, %s\n", n.Name(), n.IPv4(), n.IPv6(), n.PodCIDRv4(), n.PodCIDRv6())
		}
		p, err := n.AddPod(s.pod)
		if err != nil {
			return err
		}
		pods[s.pod] = p
		fmt.Printf("  pod %-8s %s, %s  netns %s\n", p.Name(), p.IPv4(), p.IPv6(), p.NetNSPath())
	}
	for _, name := range []string{"server1", "server2"} {
		proc, err := pods[name].Start(app, "sink", "-l", ":9000")
		if err != nil {
			return err
		}
		if err := proc.WaitOutput("listening", 10*time.Second); err != nil {
			return err
		}
	}
	fmt.Println("\ntraffic (16 MiB each, sha256 checked by the sink):")
	for _, c := range []struct{ from, to string }{{"client1", "server1"}, {"client1", "server2"}, {"client2", "server1"}} {
		for _, dst := range []netip.Addr{pods[c.to].IPv4(), pods[c.to].IPv6()} {
			if err := ctx.Err(); err != nil {
				return err
			}
			addr := netip.AddrPortFrom(dst, 9000)
			proc, err := pods[c.from].Start(app, "source", "-c", addr.String(), "-n", "16777216")
			if err != nil {
				return err
			}
			if err := proc.Wait(); err != nil {
				return err
			}
			var r struct {
				Bytes   int64
				OK      bool
				Seconds float64
			}
			if err := json.Unmarshal([]byte(proc.Output()), &r); err != nil {
				return fmt.Errorf("source output %q: %w", proc.Output(), err)
			}
			fmt.Printf("  %-8s -> %-8s %-28s %d bytes intact=%v %.0f Mbit/s\n", c.from, c.to, addr, r.Bytes, r.OK,
				float64(r.Bytes)*8/r.Seconds/1e6)
		}
	}
	fmt.Println("\n(the mesh — capture, HBONE and identities — joins this demo with the node agent)")
	return nil
}
