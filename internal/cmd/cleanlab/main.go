// Command cleanlab removes what crashed lab runs left on this host: their
// processes (by cgroup membership), network namespaces, cgroups, BPF pins and
// lock files. Runs that are still alive are left alone. It backs make clean-lab.
package main

import (
	"fmt"
	"os"

	"github.com/warren-mesh/warren/tests/cluster"
	"github.com/warren-mesh/warren/tests/lab"
)

func main() {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "cleanlab: needs root (run: sudo make clean-lab)")
		os.Exit(1)
	}
	before, err := lab.Leftovers()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cleanlab:", err)
		os.Exit(1)
	}
	if err := lab.CleanStale(); err != nil {
		fmt.Fprintln(os.Stderr, "cleanlab:", err)
		os.Exit(1)
	}
	after, err := lab.Leftovers()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cleanlab:", err)
		os.Exit(1)
	}
	fmt.Printf("cleanlab: removed %d stale lab run(s); %d live run(s) kept %v\n", len(before)-len(after), len(after), after)
	// Real-node cluster runs (tests/cluster): daemons, pods, bridge, cgroups, nft tables, sysctls, shared mounts.
	cbefore, err := cluster.Leftovers()
	if err == nil {
		err = cluster.CleanStale()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cleanlab: cluster:", err)
		os.Exit(1)
	}
	cafter, _ := cluster.Leftovers()
	fmt.Printf("cleanlab: removed %d stale cluster run(s); %d live run(s) kept %v\n", len(cbefore)-len(cafter), len(cafter), cafter)
}
