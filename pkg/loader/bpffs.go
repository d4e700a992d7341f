package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ensureBPFFS makes pinDir, first mounting a bpffs at its parent when the
// parent is not on one (hosts without /sys/fs/bpf mounted, as Cilium does).
// The mount is left in place: other BPF users share it.
func ensureBPFFS(pinDir string) error {
	parent := filepath.Dir(pinDir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", parent, err)
	}
	on, err := onBPFFS(parent)
	if err != nil {
		return err
	}
	if !on {
		if err := unix.Mount("bpffs", parent, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mount bpffs at %s: %w", parent, err)
		}
	}
	if err := os.Mkdir(pinDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create pin dir %s: %w", pinDir, err)
	}
	if err := os.MkdirAll(filepath.Join(pinDir, pinNetnsDir), 0o700); err != nil {
		return fmt.Errorf("create pin dir %s: %w", pinDir, err)
	}
	return nil
}

func onBPFFS(dir string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return uint32(st.Type) == unix.BPF_FS_MAGIC, nil
}
