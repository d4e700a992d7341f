package ociimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// dockerfile is the parsed part of the project's Dockerfile that an image
// definition must match.
type dockerfile struct {
	runtimeBase string   // FROM of the last stage
	copies      []string // COPY of the last stage: "from:src dest"
	entrypoint  []string
	user        string
	workdir     string
	buildRun    []string // the RUN with "go build" in an earlier stage, split into words
}

func parseDockerfile(t *testing.T, path string) dockerfile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d dockerfile
	stage := -1
	for _, line := range strings.Split(strings.ReplaceAll(string(b), "\\\n", " "), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		instr, rest, _ := strings.Cut(line, " ")
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "FROM":
			stage++
			base, _, _ := strings.Cut(rest, " ")
			d.runtimeBase, d.copies, d.entrypoint, d.user, d.workdir = base, nil, nil, "", ""
		case "COPY":
			w := shellWords(t, rest)
			from := ""
			if strings.HasPrefix(w[0], "--from=") {
				from, w = strings.TrimPrefix(w[0], "--from="), w[1:]
			}
			d.copies = append(d.copies, from+":"+strings.Join(w, " "))
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(rest), &d.entrypoint); err != nil {
				t.Fatalf("ENTRYPOINT must be exec form (JSON): %q: %v", rest, err)
			}
		case "USER":
			d.user = rest
		case "WORKDIR":
			d.workdir = rest
		case "RUN":
			if strings.Contains(rest, "go build") {
				d.buildRun = shellWords(t, rest)
			}
		}
	}
	if stage < 1 {
		t.Fatalf("%s: expected a build stage and a runtime stage", path)
	}
	return d
}

// shellWords splits like sh for the simple quoting Dockerfiles use.
func shellWords(t *testing.T, s string) []string {
	var out []string
	var cur strings.Builder
	inWord := false
	var quote rune
	for _, r := range s {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		t.Fatalf("unterminated quote in %q", s)
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out
}

// TestNodeAgentMatchesDockerfile fails when the Dockerfile and NodeAgent
// (the image the real-node tests build without a container engine) part ways:
// runtime base, the binary's build command and place, entrypoint, user.
func TestNodeAgentMatchesDockerfile(t *testing.T) {
	d := parseDockerfile(t, filepath.Join("..", "..", "Dockerfile"))
	if d.runtimeBase != NodeAgentBase {
		t.Errorf("Dockerfile runtime base %q; ociimage.DistrolessStatic models %q: update both", d.runtimeBase, NodeAgentBase)
	}
	want := "build:" + NodeAgentBuild.Out + " " + NodeAgentPath
	if !slices.Equal(d.copies, []string{want}) {
		t.Errorf("Dockerfile runtime stage COPY %q; NodeAgent has only %q", d.copies, want)
	}
	img := NodeAgent("x:1", "/dev/null")
	if !slices.Equal(d.entrypoint, img.Entrypoint) {
		t.Errorf("ENTRYPOINT %q, NodeAgent %q", d.entrypoint, img.Entrypoint)
	}
	if d.user != img.User {
		t.Errorf("USER %q, NodeAgent %q", d.user, img.User)
	}
	if d.workdir != "" && d.workdir != img.WorkingDir {
		t.Errorf("WORKDIR %q, NodeAgent %q", d.workdir, img.WorkingDir)
	}
	// The build: leading VAR=value words are the environment, then go and its arguments.
	w := d.buildRun
	var env []string
	for len(w) > 0 && strings.Contains(w[0], "=") {
		env, w = append(env, w[0]), w[1:]
	}
	if len(w) == 0 || w[0] != "go" {
		t.Fatalf("Dockerfile build RUN %q does not run go", d.buildRun)
	}
	if !slices.Equal(env, NodeAgentBuild.Env) || !slices.Equal(w[1:], NodeAgentBuild.Args) {
		t.Errorf("Dockerfile builds with env %q args %q; NodeAgentBuild has %q %q", env, w[1:], NodeAgentBuild.Env, NodeAgentBuild.Args)
	}
}

// TestDockerArchive checks the archive's layout and that the layer holds the
// files with their modes, and is reproducible.
func TestDockerArchive(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "bin")
	os.WriteFile(bin, []byte("#!/bin/true\n"), 0o755)
	img := NodeAgent("example.test/warren:1", bin)
	var a, b bytes.Buffer
	if err := img.WriteDockerArchive(&a); err != nil {
		t.Fatal(err)
	}
	img.WriteDockerArchive(&b)
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two builds of the same image differ")
	}
	files := map[string][]byte{}
	tr := tar.NewReader(&a)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		files[h.Name] = data
	}
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("manifest.json: %v %s", err, files["manifest.json"])
	}
	m := manifest[0]
	if !slices.Equal(m.RepoTags, []string{"example.test/warren:1"}) || len(m.Layers) != 1 {
		t.Fatalf("manifest %+v", m)
	}
	var cfg Config
	if err := json.Unmarshal(files[m.Config], &cfg); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Config.Entrypoint, []string{NodeAgentPath}) {
		t.Errorf("config entrypoint %q", cfg.Config.Entrypoint)
	}
	layer := tar.NewReader(bytes.NewReader(files[m.Layers[0]]))
	modes := map[string]int64{}
	for {
		h, err := layer.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		modes[h.Name] = h.Mode
	}
	for name, mode := range map[string]int64{"usr/local/bin/nodeagent": 0o755, "usr/local/bin/": 0o755, "tmp/": 0o1777, "etc/passwd": 0o644} {
		if got, ok := modes[name]; !ok || got != mode {
			t.Errorf("layer %s: mode %o (present %v), want %o", name, got, ok, mode)
		}
	}
}
