package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/localfile"
	"github.com/warren-mesh/warren/pkg/config/store"
)

// provider feeds the configuration store: the local file, Kubernetes or
// istiod's xDS.
type provider interface {
	// Run publishes every valid configuration until ctx ends.
	Run(ctx context.Context) error
	// LastError is why the latest configuration was rejected, or nil.
	LastError() error
	// Status is the provider's state for /config_dump.
	Status() any
}

// providers lists the --provider values.
var providers = []string{"file", "kubernetes", "istiod"}

func newProvider(o *runOptions, st *store.Store, log *slog.Logger) (provider, error) {
	switch o.provider {
	case "file":
		if o.configPath == "" {
			return nil, fmt.Errorf("--config is required with --provider=file (a YAML file with workloads, services and policies; see examples/local-config.yaml)")
		}
		p := localfile.New(o.configPath, st, localfile.Options{Config: config.Options{Node: o.node}, Logger: log})
		if err := p.Reload(); err != nil {
			// The file may be fixed while we run: the provider keeps polling it.
			log.Error("configuration rejected; waiting for a valid file", "path", o.configPath, "err", err)
		}
		return fileProvider{p}, nil
	case "kubernetes":
		return newKubeProvider(o, st, log)
	case "istiod":
		return newIstiodProvider(o, st, log)
	default:
		return nil, fmt.Errorf("--provider %q: want one of %v", o.provider, providers)
	}
}

// fileProvider adapts localfile.Provider.
type fileProvider struct{ *localfile.Provider }

func (f fileProvider) Status() any { return f.Provider.Status() }
