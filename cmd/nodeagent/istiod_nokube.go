//go:build nokube

package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/warren-mesh/warren/pkg/config/xds"
)

// newLocalPods needs a Pod informer of this node (for pod UIDs), which this
// build leaves out.
func newLocalPods(*runOptions, *slog.Logger) (xds.LocalPods, func(context.Context) error, error) {
	return nil, nil, errors.New("finding this node's pods needs the Kubernetes client: this nodeagent was built with -tags nokube; use the default build")
}
