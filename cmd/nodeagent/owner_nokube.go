//go:build nokube

package main

import (
	"context"
	"log/slog"
)

// ownerWatch needs Kubernetes: without it SIGTERM always keeps the pins.
type ownerWatch struct{}

func newOwnerWatchFromFlags(*runOptions, *slog.Logger) (*ownerWatch, error) { return nil, nil }

func (w *ownerWatch) run(context.Context) {}

func (w *ownerWatch) uninstalled(context.Context) (bool, string) {
	return false, "built without Kubernetes: keeping the pins"
}
