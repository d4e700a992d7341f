// Package ociimage writes container images without a container engine: a
// root file system described in Go (files from the host, generated /etc
// files) becomes a one-layer image in docker-archive form ("docker save"),
// which `ctr -n k8s.io images import` and `docker load` read. The real-node
// tests (tests/cluster) build the node agent's image this way, from the same
// definition as the Dockerfile (NodeAgent; dockerfile_test.go keeps the two
// in sync), plus a pause image and the test application's image.
package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"
)

// File is one entry of an image's root file system.
type File struct {
	// Path inside the image, absolute ("/usr/local/bin/nodeagent").
	Path string
	// Mode holds the permission bits; 0 means 0644 for files, 0755 for directories.
	Mode int64
	// Exactly one of these: Src (a host file, copied), Data (contents),
	// Link (a symlink target), Dir (a directory).
	Src  string
	Data []byte
	Link string
	Dir  bool
}

// Image is a one-layer image.
type Image struct {
	// Ref is the name:tag the import registers ("ghcr.io/warren-mesh/warren:0.1.0").
	Ref        string
	Files      []File
	Entrypoint []string
	Cmd        []string
	Env        []string
	// User is the image's USER ("" is root, as in the Dockerfile without USER).
	User       string
	WorkingDir string
}

// epoch makes builds reproducible: the same files give the same digests.
var epoch = time.Unix(0, 0).UTC()

// Layer returns the image's layer as an uncompressed tar, entries sorted by
// path, parents created as needed, owned by root, times at the epoch.
func (img Image) Layer() ([]byte, error) {
	entries := map[string]File{}
	for _, f := range img.Files {
		p := path.Clean("/" + f.Path)
		if p == "/" {
			continue
		}
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = File{Path: d, Dir: true}
			}
		}
		f.Path = p
		entries[p] = f
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		f := entries[n]
		h := &tar.Header{Name: strings.TrimPrefix(n, "/"), ModTime: epoch, Mode: f.Mode, Format: tar.FormatPAX}
		var data []byte
		switch {
		case f.Dir:
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
			if h.Mode == 0 {
				h.Mode = 0o755
			}
		case f.Link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.Link, 0o777
		default:
			h.Typeflag = tar.TypeReg
			data = f.Data
			if f.Src != "" {
				b, err := os.ReadFile(f.Src)
				if err != nil {
					return nil, fmt.Errorf("image %s: %w", img.Ref, err)
				}
				data = b
			}
			if h.Mode == 0 {
				h.Mode = 0o644
			}
			h.Size = int64(len(data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Config is the image configuration (the OCI/Docker "config" object).
type Config struct {
	Architecture string       `json:"architecture"`
	OS           string       `json:"os"`
	Created      time.Time    `json:"created"`
	Config       RunConfig    `json:"config"`
	RootFS       RootFS       `json:"rootfs"`
	History      []HistoryRow `json:"history"`
}

// RunConfig is what the runtime reads: entrypoint, command, user, environment.
type RunConfig struct {
	User       string   `json:"User,omitempty"`
	Env        []string `json:"Env,omitempty"`
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
}

// RootFS lists the layers' uncompressed digests.
type RootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

// HistoryRow says who made a layer.
type HistoryRow struct {
	Created   time.Time `json:"created"`
	CreatedBy string    `json:"created_by"`
}

// Config returns the image's configuration for a layer with the given digest.
func (img Image) Config(layerDigest string) Config {
	return Config{
		Architecture: "amd64", OS: "linux", Created: epoch,
		Config:  RunConfig{User: img.User, Env: img.Env, Entrypoint: img.Entrypoint, Cmd: img.Cmd, WorkingDir: img.WorkingDir},
		RootFS:  RootFS{Type: "layers", DiffIDs: []string{layerDigest}},
		History: []HistoryRow{{Created: epoch, CreatedBy: "warren internal/ociimage"}},
	}
}

// WriteDockerArchive writes the image as a docker-archive tarball
// (manifest.json, <config digest>.json, <layer digest>/layer.tar).
func (img Image) WriteDockerArchive(w io.Writer) error {
	layer, err := img.Layer()
	if err != nil {
		return err
	}
	lsum := sha256.Sum256(layer)
	lhex := hex.EncodeToString(lsum[:])
	cfg, err := json.Marshal(img.Config("sha256:" + lhex))
	if err != nil {
		return err
	}
	csum := sha256.Sum256(cfg)
	chex := hex.EncodeToString(csum[:])
	manifest, err := json.Marshal([]map[string]any{{
		"Config": chex + ".json", "RepoTags": []string{img.Ref}, "Layers": []string{lhex + "/layer.tar"},
	}})
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	for _, e := range []struct {
		name string
		data []byte
		dir  bool
	}{
		{name: lhex + "/", dir: true},
		{name: lhex + "/layer.tar", data: layer},
		{name: chex + ".json", data: cfg},
		{name: "manifest.json", data: manifest},
	} {
		h := &tar.Header{Name: e.name, ModTime: epoch, Mode: 0o644, Size: int64(len(e.data)), Typeflag: tar.TypeReg}
		if e.dir {
			h.Typeflag, h.Mode, h.Size = tar.TypeDir, 0o755, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

// WriteFile writes the docker archive to path.
func (img Image) WriteFile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := img.WriteDockerArchive(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}
