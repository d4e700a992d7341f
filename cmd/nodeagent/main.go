// Command nodeagent is warren's per-node agent: it captures the TCP traffic of
// enrolled pods with eBPF and carries it between nodes over HBONE.
package main

import (
	"fmt"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "nodeagent",
		Short:         "warren node agent: eBPF capture and HBONE tunnel for enrolled pods",
		SilenceUsage:  true,
		SilenceErrors: false,
	}
	root.AddCommand(newRunCmd(), newDoctorCmd(), newInspectCmd(), newUninstallCmd(), newCACmd(), newFDStoreCmd())
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print the build's version",
		Run: func(cmd *cobra.Command, _ []string) {
			v := "devel"
			if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
				v = bi.Main.Version
			}
			fmt.Fprintf(cmd.OutOrStdout(), "nodeagent %s\n", v)
		},
	})
	return root
}
