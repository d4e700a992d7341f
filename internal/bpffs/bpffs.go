// Package bpffs checks and mounts the BPF file system that holds pins.
package bpffs

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// DefaultRoot is where hosts conventionally mount bpffs.
const DefaultRoot = "/sys/fs/bpf"

// IsMounted reports whether path is on a BPF file system.
func IsMounted(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// EnsureMounted mounts bpffs at root unless one is mounted there already, as
// systemd does at boot and Cilium does when a host lacks it.
func EnsureMounted(root string) error {
	// Create it first: a directory made inside an existing bpffs is on that
	// bpffs and needs no mount of its own.
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("create bpffs mount point %s: %w", root, err)
	}
	ok, err := IsMounted(root)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w (mount it yourself: mount -t bpf bpf %s)", root, err, root)
	}
	return nil
}
