package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/warren-mesh/warren/pkg/loader"
	"github.com/warren-mesh/warren/pkg/transparent"
)

func newUninstallCmd() *cobra.Command {
	var pinDir string
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Detach warren's BPF programs and remove every pin, link and map (capture stops)",
		Long: `Detach warren's BPF programs and remove every pin, link and map under --pin-dir.

Run it after removing the agent for good: while the pins exist, capture keeps
redirecting enrolled pods' connections to listeners that no longer run. It also
removes, from the enrolled pods' network namespaces (found among
/proc/<pid>/ns/net and /var/run/netns by netns cookie), the policy routing the agent installed for source address
preservation, and restores tcp_fwmark_accept where the agent had set it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			// First, while wr_pods still says which namespaces are ours.
			pods, err := loader.PinnedEnrolled(pinDir)
			if err != nil {
				return fmt.Errorf("uninstall: %w", err)
			}
			n, serr := transparent.Sweep(pods)
			if err := loader.Uninstall(pinDir); err != nil {
				return fmt.Errorf("uninstall: %w", errors.Join(err, serr))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed warren's BPF programs, links and maps under %s\n", pinDir)
			if serr != nil {
				return fmt.Errorf("uninstall: remove source-preservation routing: %w", serr)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed source-preservation routing from %d network namespaces\n", n)
			return nil
		},
	}
	cmd.Flags().StringVar(&pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory the agent pinned under")
	documentEnv(cmd.Flags())
	return cmd
}
