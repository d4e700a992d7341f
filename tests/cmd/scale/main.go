// Command scale runs the mesh-scale benchmark of issue #18 (package
// tests/scale): the full mesh (100,000 workloads, 20,000 services, 5,000
// policies) published to a store, then a minute of 1 %/s one-workload
// churn; the same mesh as one local file; and through the istiod provider
// from an in-process delta ADS server. Each part runs in its own process
// (this command re-runs itself with -only), so that one part's heap, RSS
// and CPU do not leak into another's figures. It prints the targets table
// and writes JSON, Markdown and a heap profile when asked. `make bench`
// runs it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"time"

	"github.com/warren-mesh/warren/tests/scale"
)

func main() {
	short := flag.Bool("short", false, "the CI mesh (5,000 workloads) instead of the full one")
	churn := flag.Duration("churn", time.Minute, "how long to churn")
	rate := flag.Float64("rate", 0.01, "fraction of workloads changed per second")
	readers := flag.Int("readers", 2, "reader goroutines looking up VIPs and IPs")
	lookups := flag.Int("lookups", 5000, "lookups per second per reader")
	file := flag.Bool("file", true, "also measure the local-file provider on the mesh as one file")
	xdsDeltas := flag.Int("xds", -1, "also feed the mesh through the istiod provider, then this many one-workload deltas paced at -rate (-1: as many as the churn, rate × workloads × churn; 0: skip)")
	only := flag.String("only", "", "run one part in this process: store, file or xds (default: each in its own process)")
	jsonOut := flag.String("json", "", "write the report as JSON here")
	mdOut := flag.String("md", "", "write the report as Markdown here")
	heap := flag.String("memprofile", "", "write a heap profile with the full view here")
	flag.Parse()
	log.SetFlags(log.Ltime)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	mesh := scale.Full
	if *short {
		mesh = scale.Short
	}
	if *xdsDeltas < 0 {
		*xdsDeltas = int(*rate * float64(mesh.Workloads) * churn.Seconds())
	}
	var r *scale.Report
	switch *only {
	case "store":
		var err error
		r, err = scale.Run(ctx, scale.Options{Mesh: mesh, ChurnRate: *rate, ChurnFor: *churn, Readers: *readers,
			LookupRate: *lookups, HeapProfile: *heap, Log: log.Printf})
		if err != nil {
			log.Fatal(err)
		}
	case "file":
		f, err := scale.ParseFile(mesh)
		if err != nil {
			log.Fatal(err)
		}
		r = &scale.Report{File: f}
	case "xds":
		x, err := scale.RunXDS(ctx, mesh, *xdsDeltas, *rate)
		if err != nil {
			log.Fatal(err)
		}
		r = &scale.Report{XDS: x}
	case "":
		r = parts(*file, *xdsDeltas)
	default:
		log.Fatalf("-only %q: want store, file or xds", *only)
	}
	if *only != "" && *only != "store" {
		writeJSON(*jsonOut, r)
		return
	}
	md := scale.Markdown(r)
	fmt.Print(md)
	writeJSON(*jsonOut, r)
	if *mdOut != "" {
		if err := os.WriteFile(*mdOut, []byte(md), 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

// parts runs each part in a child process and merges their reports.
func parts(file bool, xdsDeltas int) *scale.Report {
	self, err := os.Executable()
	if err != nil {
		log.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "scale")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	run := func(part string) *scale.Report {
		out := filepath.Join(dir, part+".json")
		args := []string{"-only", part, "-json", out}
		flag.Visit(func(f *flag.Flag) {
			if f.Name != "only" && f.Name != "json" && f.Name != "md" {
				args = append(args, "-"+f.Name+"="+f.Value.String())
			}
		})
		cmd := exec.Command(self, args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			log.Fatalf("part %s: %v", part, err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			log.Fatal(err)
		}
		var r scale.Report
		if err := json.Unmarshal(b, &r); err != nil {
			log.Fatalf("part %s: %v", part, err)
		}
		return &r
	}
	r := run("store")
	if file {
		r.File = run("file").File
	}
	if xdsDeltas > 0 {
		r.XDS = run("xds").XDS
	}
	return r
}

func writeJSON(path string, r *scale.Report) {
	if path == "" {
		return
	}
	js, _ := json.MarshalIndent(r, "", "  ")
	if err := os.WriteFile(path, append(js, '\n'), 0o644); err != nil {
		log.Fatal(err)
	}
}
