// Command mkimage writes the node agent's image as a docker-archive tarball
// without a container engine, from the same definition as the Dockerfile
// (internal/ociimage.NodeAgent; a test keeps them in sync):
//
//	go run ./internal/cmd/mkimage -o build/warren.tar [-ref ghcr.io/warren-mesh/warren:0.1.0]
//	ctr -n k8s.io images import build/warren.tar
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/warren-mesh/warren/internal/ociimage"
)

func main() {
	out := flag.String("o", "build/warren.tar", "archive to write")
	ref := flag.String("ref", "", "image name:tag (default ghcr.io/warren-mesh/warren:<chart appVersion>)")
	flag.Parse()
	if *ref == "" {
		b, err := os.ReadFile("charts/warren/Chart.yaml")
		if err != nil {
			fail(err)
		}
		m := regexp.MustCompile(`(?m)^appVersion:\s*"?([^"\s]+)"?`).FindSubmatch(b)
		if m == nil {
			fail(fmt.Errorf("no appVersion in charts/warren/Chart.yaml"))
		}
		*ref = "ghcr.io/warren-mesh/warren:" + string(m[1])
	}
	tmp, err := os.MkdirTemp("", "mkimage")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "nodeagent")
	if err := ociimage.NodeAgentBuild.GoBuild(context.Background(), "go", ".", bin); err != nil {
		fail(err)
	}
	if err := ociimage.NodeAgent(*ref, bin).WriteFile(*out); err != nil {
		fail(err)
	}
	fmt.Printf("mkimage: %s -> %s\n", *ref, *out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mkimage:", err)
	os.Exit(1)
}
