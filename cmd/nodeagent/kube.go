//go:build !nokube

package main

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/spf13/pflag"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/store"
)

// kubeOptions are the settings of --provider=kubernetes.
type kubeOptions struct {
	kubeconfig    string
	enrollLabel   string
	rootNamespace string
	clusterID     string
	domain        string
	procRoot      string
	netnsDirs     []string
	annotate      bool
}

// addFlags registers the Kubernetes provider's flags on the run command.
func (k *kubeOptions) addFlags(f *pflag.FlagSet) {
	f.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (--provider=kubernetes; default: the pod's service account)")
	f.StringVar(&k.enrollLabel, "enroll-label", kube.DefaultEnrollLabel+"="+kube.DefaultEnrollValue,
		"namespace label key=value that enrolls a namespace's pods; the pod label key=none opts a pod out (--provider=kubernetes)")
	f.StringVar(&k.rootNamespace, "root-namespace", kube.DefaultRootNamespace, "namespace whose policies apply mesh-wide (--provider=kubernetes)")
	f.StringVar(&k.clusterID, "cluster-id", kube.DefaultClusterID, "cluster name in workload UIDs (--provider=kubernetes) and in certificate requests to istiod (--ca-provider=istiod)")
	f.StringVar(&k.domain, "cluster-domain", kube.DefaultDomain, "cluster DNS domain of service hostnames (--provider=kubernetes)")
	f.StringVar(&k.procRoot, "proc-root", "/proc", "the host's /proc, scanned for pods' network namespaces (--provider=kubernetes; needs hostPID)")
	f.StringSliceVar(&k.netnsDirs, "netns-dirs", []string{"/var/run/netns"}, "directories of network-namespace bind mounts preferred to /proc paths (--provider=kubernetes)")
	f.BoolVar(&k.annotate, "annotate-pods", true, "annotate enrolled pods "+kube.RedirectionAnnotation+"="+kube.RedirectionEnabled+
		" (--provider=kubernetes; --provider=istiod: this node's pods of namespaces labelled "+kube.DefaultEnrollLabel+"="+kube.DefaultEnrollValue+
		" once their network namespace is found, which is what makes istiod mark them HBONE)")
}

// istioClusterID is the cluster name sent to istiod with certificate
// requests (--ca-provider=istiod): --cluster-id, Istio's CLUSTER_ID.
func (k *kubeOptions) istioClusterID() string { return k.clusterID }

// restConfig returns the API server's client configuration.
func (k *kubeOptions) restConfig() (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if k.kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", k.kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client configuration (set --kubeconfig outside a pod): %w", err)
	}
	cfg.UserAgent = "warren-nodeagent"
	cfg.QPS, cfg.Burst = 20, 40
	return cfg, nil
}

// newKubeProvider builds the Kubernetes provider for --provider=kubernetes.
func newKubeProvider(o *runOptions, st *store.Store, log *slog.Logger) (provider, error) {
	k := &o.kube
	key, value, ok := strings.Cut(k.enrollLabel, "=")
	if !ok || key == "" || value == "" {
		return nil, fmt.Errorf("--enroll-label %q: want key=value", k.enrollLabel)
	}
	cfg, err := k.restConfig()
	if err != nil {
		return nil, err
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("istio client: %w", err)
	}
	p, err := kube.New(kc, ic, st, kube.Options{
		Node:          o.node,
		TrustDomain:   o.trustDomain,
		ClusterID:     k.clusterID,
		Domain:        k.domain,
		RootNamespace: k.rootNamespace,
		EnrollLabel:   key,
		EnrollValue:   value,
		Resolver:      kube.ProcResolver{ProcRoot: k.procRoot, NetnsDirs: k.netnsDirs},
		NoAnnotate:    !k.annotate,
		Logger:        log,
	})
	if err != nil {
		return nil, err
	}
	return kubeProvider{p}, nil
}

// kubeProvider adapts kube.Provider.
type kubeProvider struct{ *kube.Provider }

func (k kubeProvider) Status() any { return k.Provider.Status() }
