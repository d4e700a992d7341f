package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/spf13/pflag"

	"github.com/warren-mesh/warren/pkg/config/store"
	"github.com/warren-mesh/warren/pkg/config/xds"
)

// istiodOptions are the settings of --provider=istiod. istiod is reached
// with the same mesh root and token as its CA (--istiod-root-ca,
// --istiod-token-file), as ztunnel does.
type istiodOptions struct {
	xdsAddress   string
	podName      string
	podNamespace string
	instanceIPs  []string
}

// addFlags registers the istiod provider's flags on the run command.
func (i *istiodOptions) addFlags(f *pflag.FlagSet) {
	f.StringVar(&i.xdsAddress, "xds-address", "istiod.istio-system.svc:15012",
		"istiod's xDS address; its host is the TLS server name checked against --istiod-root-ca (--provider=istiod)")
	f.StringVar(&i.podName, "pod-name", os.Getenv("POD_NAME"), "the agent's pod name (default $POD_NAME): in the xDS node ID (--provider=istiod), and whose DaemonSet, when deleted, makes SIGTERM with no successor uninstall capture from the node (unset: SIGTERM always keeps the pins)")
	f.StringVar(&i.podNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "the agent's namespace (default $POD_NAMESPACE), in the xDS node ID (istiod checks it against the token's) and of --pod-name")
	f.StringSliceVar(&i.instanceIPs, "instance-ips", nil, "the agent's pod IPs, in the xDS node ID and INSTANCE_IPS (--provider=istiod; default $INSTANCE_IP)")
}

// newIstiodProvider builds the provider for --provider=istiod.
func newIstiodProvider(o *runOptions, st *store.Store, log *slog.Logger) (provider, error) {
	i := &o.istiod
	host, _, err := net.SplitHostPort(i.xdsAddress)
	if err != nil {
		return nil, fmt.Errorf("--xds-address %q: want host:port, e.g. istiod.istio-system.svc:15012: %w", i.xdsAddress, err)
	}
	if i.podName == "" || i.podNamespace == "" {
		return nil, fmt.Errorf("--provider=istiod needs --pod-name and --pod-namespace (POD_NAME, POD_NAMESPACE from the downward API): istiod authorizes the node ID's namespace")
	}
	ips := i.instanceIPs
	if len(ips) == 0 && os.Getenv("INSTANCE_IP") != "" {
		ips = []string{os.Getenv("INSTANCE_IP")}
	}
	hint := "mount Istio's istio-ca-root-cert ConfigMap there"
	if _, err := readRoots(o.ca.istiodRootCA, "--istiod-root-ca", hint); err != nil {
		return nil, fmt.Errorf("--provider=istiod: %w", err)
	}
	if _, err := os.Stat(o.ca.istiodTokenFile); err != nil {
		return nil, fmt.Errorf("--provider=istiod: --istiod-token-file: %w (mount a projected service-account token with audience istio-ca there)", err)
	}
	pods, start, err := newLocalPods(o, log)
	if err != nil {
		return nil, fmt.Errorf("--provider=istiod: %w", err)
	}
	p, err := xds.New(st, xds.Options{
		Address:      i.xdsAddress,
		TLS:          istiodTLS(o.ca.istiodRootCA, host, "--istiod-root-ca", hint),
		TokenFile:    o.ca.istiodTokenFile,
		Node:         o.node,
		PodName:      i.podName,
		PodNamespace: i.podNamespace,
		InstanceIPs:  ips,
		ClusterID:    o.kube.istioClusterID(),
		LocalPods:    pods,
		Logger:       log,
	})
	if err != nil {
		return nil, err
	}
	return istiodProvider{Provider: p, start: start}, nil
}

// istiodProvider adapts xds.Provider; start runs what finds local pods.
type istiodProvider struct {
	*xds.Provider
	start func(ctx context.Context) error
}

func (p istiodProvider) Status() any { return p.Provider.Status() }

func (p istiodProvider) Run(ctx context.Context) error {
	if p.start != nil {
		if err := p.start(ctx); err != nil {
			return err
		}
	}
	return p.Provider.Run(ctx)
}
