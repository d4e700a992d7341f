//go:build nokube

package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// newCACmd is `nodeagent ca`; the CA service needs the Kubernetes API, which
// a nokube build leaves out.
func newCACmd() *cobra.Command {
	return &cobra.Command{
		Use:   "ca",
		Short: "warren's CA service (not in this build: it needs Kubernetes)",
		RunE: func(*cobra.Command, []string) error {
			return errors.New("this nodeagent was built with -tags nokube, without the Kubernetes client the CA service needs: use the default build")
		},
	}
}
