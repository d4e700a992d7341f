package ociimage

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// DistrolessStatic is the part of gcr.io/distroless/static-debian12 (the
// Dockerfile's runtime base) that a static Go binary uses: /etc/passwd and
// /etc/group with root and nonroot, nsswitch.conf, a world-writable /tmp,
// the CA bundle location, and the base's environment. The CA bundle is the
// build host's (Debian ca-certificates) when present.
func DistrolessStatic() ([]File, []string) {
	files := []File{
		{Path: "/etc/passwd", Data: []byte("root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{Path: "/etc/group", Data: []byte("root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n")},
		{Path: "/etc/nsswitch.conf", Data: []byte("hosts: files dns\n")},
		{Path: "/tmp", Dir: true, Mode: 0o1777},
		{Path: "/root", Dir: true, Mode: 0o700},
		{Path: "/home/nonroot", Dir: true, Mode: 0o700},
		{Path: "/etc/ssl/certs", Dir: true},
	}
	if _, err := os.Stat("/etc/ssl/certs/ca-certificates.crt"); err == nil {
		files = append(files, File{Path: "/etc/ssl/certs/ca-certificates.crt", Src: "/etc/ssl/certs/ca-certificates.crt"})
	}
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"}
	return files, env
}

// NodeAgentBuild is the Dockerfile's build step: how /out/nodeagent is made.
var NodeAgentBuild = BuildSpec{
	Env:     []string{"CGO_ENABLED=0"},
	Args:    []string{"build", "-trimpath", "-ldflags", "-s -w", "-o", "/out/nodeagent", "./cmd/nodeagent"},
	Out:     "/out/nodeagent",
	Package: "./cmd/nodeagent",
}

// NodeAgentBase is the Dockerfile's runtime FROM.
const NodeAgentBase = "gcr.io/distroless/static-debian12"

// NodeAgentPath is where the Dockerfile copies the binary, and the entrypoint.
const NodeAgentPath = "/usr/local/bin/nodeagent"

// NodeAgent is the image the Dockerfile describes, with the binary at bin
// (built by NodeAgentBuild).
func NodeAgent(ref, bin string) Image {
	files, env := DistrolessStatic()
	return Image{
		Ref:        ref,
		Files:      append(files, File{Path: NodeAgentPath, Src: bin, Mode: 0o755}),
		Entrypoint: []string{NodeAgentPath},
		Env:        env,
		User:       "", // distroless/static-debian12 (not :nonroot) runs as root; the Dockerfile sets no USER
		WorkingDir: "/",
	}
}

// Static is a one-binary image (pause, the test app) on the same base.
func Static(ref, bin, at string, cmd []string) Image {
	files, env := DistrolessStatic()
	return Image{
		Ref:        ref,
		Files:      append(files, File{Path: at, Src: bin, Mode: 0o755}),
		Entrypoint: []string{at},
		Cmd:        cmd,
		Env:        env,
		WorkingDir: "/",
	}
}

// BuildSpec is a `go build` of one static binary.
type BuildSpec struct {
	Env     []string
	Args    []string // go's arguments, with Out after -o
	Out     string
	Package string
}

// GoBuild runs the build from the module root dir, writing the binary to out.
func (b BuildSpec) GoBuild(ctx context.Context, goBin, dir, out string) error {
	args := append([]string(nil), b.Args...)
	for i := range args {
		if args[i] == b.Out {
			args[i] = out
		}
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), b.Env...)
	// No VCS stamping: under sudo in a checkout owned by another user git
	// refuses to run ("dubious ownership") and go build would fail.
	if gf := os.Getenv("GOFLAGS"); !strings.Contains(gf, "-buildvcs") {
		cmd.Env = append(cmd.Env, strings.TrimSpace("GOFLAGS="+gf+" -buildvcs=false"))
	}
	if o, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %v: %w\n%s", args, err, o)
	}
	return nil
}
