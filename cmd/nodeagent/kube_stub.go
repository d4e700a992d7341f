//go:build nokube

// A build for hosts without Kubernetes: go build -tags nokube ./cmd/nodeagent
// leaves client-go out (a 19 MB instead of a 51 MB binary, and an idle agent
// about 17 MiB smaller, measured in BENCHMARKS.md terms: package init of
// client-go's schemes touches most of its pages even when unused).

package main

import (
	"errors"
	"log/slog"

	"github.com/spf13/pflag"

	"github.com/warren-mesh/warren/pkg/config/store"
)

type kubeOptions struct{}

func (k *kubeOptions) addFlags(*pflag.FlagSet) {}

// istioClusterID is empty without Kubernetes: istiod then assumes its own cluster.
func (k *kubeOptions) istioClusterID() string { return "" }

func newKubeProvider(*runOptions, *store.Store, *slog.Logger) (provider, error) {
	return nil, errors.New("--provider=kubernetes: this nodeagent was built with -tags nokube; use the default build")
}
