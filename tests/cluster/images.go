package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/warren-mesh/warren/internal/ociimage"
)

// Image references the tests use. The agent's is the chart's default
// (repository and appVersion), so helm install needs no image override.
const (
	PauseRef = "warren.test/pause:1"
	AppRef   = "warren.test/labapp:1"
)

// AgentRef returns the chart's default image reference, ghcr.io/warren-mesh/warren:<appVersion>.
func AgentRef(root string) (string, error) {
	b, err := os.ReadFile(filepath.Join(root, "charts", "warren", "Chart.yaml"))
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^appVersion:\s*"?([^"\s]+)"?`).FindSubmatch(b)
	if m == nil {
		return "", fmt.Errorf("no appVersion in Chart.yaml")
	}
	return "ghcr.io/warren-mesh/warren:" + string(m[1]), nil
}

// Images are the docker-archive tarballs BuildImages wrote.
type Images struct {
	Agent, Pause, App string
	// AgentBin is the static nodeagent inside Agent (for retagging).
	AgentBin string
}

// BuildImages builds the node agent (as the Dockerfile does:
// ociimage.NodeAgentBuild and ociimage.NodeAgent), the pause image and the
// test application (tests/cmd/labapp) from the module at root into dir.
func BuildImages(ctx context.Context, root, dir, agentRef string) (Images, error) {
	im := Images{
		Agent: filepath.Join(dir, "warren.tar"), Pause: filepath.Join(dir, "pause.tar"), App: filepath.Join(dir, "labapp.tar"),
		AgentBin: filepath.Join(dir, "bin", "nodeagent"),
	}
	if err := ociimage.NodeAgentBuild.GoBuild(ctx, "go", root, im.AgentBin); err != nil {
		return im, err
	}
	if err := ociimage.NodeAgent(agentRef, im.AgentBin).WriteFile(im.Agent); err != nil {
		return im, err
	}
	static := func(pkg, out string) error {
		b := ociimage.BuildSpec{Env: []string{"CGO_ENABLED=0"}, Args: []string{"build", "-trimpath", "-ldflags", "-s -w", "-o", "OUT", pkg}, Out: "OUT"}
		return b.GoBuild(ctx, "go", root, out)
	}
	pause, app := filepath.Join(dir, "bin", "pause"), filepath.Join(dir, "bin", "labapp")
	if err := static("./tests/cmd/pause", pause); err != nil {
		return im, err
	}
	if err := static("./tests/cmd/labapp", app); err != nil {
		return im, err
	}
	if err := ociimage.Static(PauseRef, pause, "/pause", nil).WriteFile(im.Pause); err != nil {
		return im, err
	}
	if err := ociimage.Static(AppRef, app, "/usr/local/bin/labapp", []string{"echo", "-l", ":8080"}).WriteFile(im.App); err != nil {
		return im, err
	}
	return im, nil
}
