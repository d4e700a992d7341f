package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/warren-mesh/warren/pkg/fdstore"
	"github.com/warren-mesh/warren/pkg/loader"
	"github.com/warren-mesh/warren/pkg/transparent"
)

func newUninstallCmd() *cobra.Command {
	var pinDir, stateDir, fdStore string
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
			// The listener holder would keep the pods' 15001/15006/15008
			// listening (and their namespaces alive): drop them too.
			o := runOptions{stateDir: stateDir, fdStore: fdStore}
			if path := o.fdStorePath(); path != "" {
				ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
				defer cancel()
				c, err := fdstore.Dial(ctx, path)
				if err != nil {
					fmt.Fprintf(cmd.OutOrStdout(), "no listener holder at %s: nothing held\n", path)
					return nil
				}
				defer c.Close()
				dropped, err := (&fdstore.ListenerStore{Client: c, Timeout: 5 * time.Second}).ForgetAll()
				if err != nil {
					return fmt.Errorf("uninstall: drop held listeners at %s: %w", path, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "dropped %d listeners held by the listener holder at %s\n", dropped, path)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory the agent pinned under")
	cmd.Flags().StringVar(&stateDir, "state-dir", defaultStateDir, "the agents' --state-dir (its listener holder's listeners are dropped)")
	cmd.Flags().StringVar(&fdStore, "fd-store", "", "the agents' --fd-store (default: <state-dir>/fdstore.sock; \"none\": leave it)")
	documentEnv(cmd.Flags())
	return cmd
}
