package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/warren-mesh/warren/internal/bpffs"
)

// ensureBPFFS makes pinDir, first mounting a bpffs at its parent when the
// parent is not on one (hosts without /sys/fs/bpf mounted, as Cilium does).
// The mount is left in place: other BPF users share it.
func ensureBPFFS(pinDir string) error {
	if err := bpffs.EnsureMounted(filepath.Dir(pinDir)); err != nil {
		return err
	}
	if err := os.Mkdir(pinDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create pin dir %s: %w", pinDir, err)
	}
	if err := os.MkdirAll(filepath.Join(pinDir, pinNetnsDir), 0o700); err != nil {
		return fmt.Errorf("create pin dir %s: %w", pinDir, err)
	}
	return nil
}
