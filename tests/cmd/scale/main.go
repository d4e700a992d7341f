// Command scale runs the mesh-scale benchmark of issue #18 (package
// tests/scale): the full mesh (100,000 workloads, 20,000 services, 5,000
// policies) published to a store, then a minute of 1 %/s one-workload
// churn; it prints the targets table and writes JSON, Markdown and a heap
// profile when asked. `make bench` runs it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"time"

	"github.com/warren-mesh/warren/tests/scale"
)

func main() {
	short := flag.Bool("short", false, "the CI mesh (5,000 workloads) instead of the full one")
	churn := flag.Duration("churn", time.Minute, "how long to churn")
	rate := flag.Float64("rate", 0.01, "fraction of workloads changed per second")
	readers := flag.Int("readers", 2, "reader goroutines looking up VIPs and IPs")
	lookups := flag.Int("lookups", 5000, "lookups per second per reader")
	jsonOut := flag.String("json", "", "write the report as JSON here")
	mdOut := flag.String("md", "", "write the report as Markdown here")
	file := flag.Bool("file", true, "also measure the local-file provider on the mesh as one file")
	xdsDeltas := flag.Int("xds", 10, "also feed the mesh through the istiod provider, then this many one-workload deltas (0: skip)")
	heap := flag.String("memprofile", "", "write a heap profile with the full view here")
	flag.Parse()
	log.SetFlags(log.Ltime)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	mesh := scale.Full
	if *short {
		mesh = scale.Short
	}
	r, err := scale.Run(ctx, scale.Options{Mesh: mesh, ChurnRate: *rate, ChurnFor: *churn, Readers: *readers,
		LookupRate: *lookups, File: *file, XDSDeltas: *xdsDeltas, HeapProfile: *heap, Log: log.Printf})
	if err != nil {
		log.Fatal(err)
	}
	md := scale.Markdown(r)
	fmt.Print(md)
	if *jsonOut != "" {
		js, _ := json.MarshalIndent(r, "", "  ")
		if err := os.WriteFile(*jsonOut, append(js, '\n'), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	if *mdOut != "" {
		if err := os.WriteFile(*mdOut, []byte(md), 0o644); err != nil {
			log.Fatal(err)
		}
	}
}
