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
			o := runOptions{stateDir: stateDir, fdStore: fdStore}
			return uninstallNode(cmd.Context(), pinDir, o.fdStorePath(), func(format string, args ...any) {
				fmt.Fprintf(cmd.OutOrStdout(), format+"\n", args...)
			})
		},
	}
	cmd.Flags().StringVar(&pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory the agent pinned under")
	cmd.Flags().StringVar(&stateDir, "state-dir", defaultStateDir, "the agents' --state-dir (its listener holder's listeners are dropped)")
	cmd.Flags().StringVar(&fdStore, "fd-store", "", "the agents' --fd-store (default: <state-dir>/fdstore.sock; \"none\": leave it)")
	documentEnv(cmd.Flags())
	return cmd
}

// uninstallNode removes warren from the node: the source-preservation
// routing of the enrolled pods' namespaces, every BPF program, link and map
// under pinDir, and the listeners the holder at fdStorePath keeps ("" for
// none). nodeagent uninstall runs it, and so does an agent that got SIGTERM
// after its DaemonSet was deleted (owner.go). say reports each step.
func uninstallNode(ctx context.Context, pinDir, fdStorePath string, say func(format string, args ...any)) error {
	// First, while wr_pods still says which namespaces are ours.
	pods, err := loader.PinnedEnrolled(pinDir)
	if err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	n, serr := transparent.Sweep(pods)
	if err := loader.Uninstall(pinDir); err != nil {
		return fmt.Errorf("uninstall: %w", errors.Join(err, serr))
	}
	say("removed warren's BPF programs, links and maps under %s", pinDir)
	if serr != nil {
		return fmt.Errorf("uninstall: remove source-preservation routing: %w", serr)
	}
	say("removed source-preservation routing from %d network namespaces", n)
	// The listener holder would keep the pods' 15001/15006/15008
	// listening (and their namespaces alive): drop them too.
	if fdStorePath == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := fdstore.Dial(ctx, fdStorePath)
	if err != nil {
		say("no listener holder at %s: nothing held", fdStorePath)
		return nil
	}
	defer c.Close()
	dropped, err := (&fdstore.ListenerStore{Client: c, Timeout: 5 * time.Second}).ForgetAll()
	if err != nil {
		return fmt.Errorf("uninstall: drop held listeners at %s: %w", fdStorePath, err)
	}
	say("dropped %d listeners held by the listener holder at %s", dropped, fdStorePath)
	return nil
}
