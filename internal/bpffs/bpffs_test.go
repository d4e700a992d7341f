package bpffs

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/testenv"
)

func TestEnsureMountedNestsWithoutNewMount(t *testing.T) {
	testenv.RequireRoot(t)
	root := t.TempDir()
	if err := EnsureMounted(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(root, unix.MNT_DETACH) })
	if ok, err := IsMounted(root); err != nil || !ok {
		t.Fatalf("IsMounted(%s) = %v, %v after EnsureMounted", root, ok, err)
	}
	// A directory that does not exist yet inside the bpffs is created there,
	// not covered by a second mount.
	nested := filepath.Join(root, "a", "b")
	if err := EnsureMounted(nested); err != nil {
		t.Fatal(err)
	}
	var st, parent unix.Stat_t
	if err := unix.Stat(nested, &st); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(root, &parent); err != nil {
		t.Fatal(err)
	}
	if st.Dev != parent.Dev {
		t.Fatalf("%s got its own mount (dev %d, parent %d)", nested, st.Dev, parent.Dev)
	}
	if _, err := os.Stat(filepath.Join(nested, "progs.debug")); err == nil {
		t.Fatal("nested directory is a fresh bpffs")
	}
}
