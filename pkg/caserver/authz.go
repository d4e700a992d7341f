package caserver

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/warren-mesh/warren/pkg/identity"
)

// nodeSAIndex indexes pods by "<node>/<namespace>/<service account>".
const nodeSAIndex = "node-sa"

func nodeSAKey(node, ns, sa string) string { return node + "/" + ns + "/" + sa }

// PodIndex is a Pod informer indexed by node and ServiceAccount: the CA's
// view of which identities run where. Pods are stripped to what the index
// needs, so a large cluster costs little memory.
type PodIndex struct {
	factory  informers.SharedInformerFactory
	informer cache.SharedIndexInformer
}

// NewPodIndex returns an index of the pods client sees; Start it.
func NewPodIndex(client kubernetes.Interface, resync time.Duration) (*PodIndex, error) {
	f := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(stripPod))
	inf := f.Core().V1().Pods().Informer()
	if err := inf.AddIndexers(cache.Indexers{nodeSAIndex: func(obj any) ([]string, error) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Spec.NodeName == "" || p.Spec.ServiceAccountName == "" {
			return nil, nil
		}
		// A pod that has finished holds no identity any more.
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			return nil, nil
		}
		return []string{nodeSAKey(p.Spec.NodeName, p.Namespace, p.Spec.ServiceAccountName)}, nil
	}}); err != nil {
		return nil, fmt.Errorf("pod index: add node/service-account indexer: %w", err)
	}
	return &PodIndex{factory: f, informer: inf}, nil
}

// stripPod keeps the fields the index reads.
func stripPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName},
		Status:     corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}

// Start starts the informer until ctx ends.
func (x *PodIndex) Start(ctx context.Context) { x.factory.Start(ctx.Done()) }

// WaitForSync waits until the first list is in the index or ctx ends.
func (x *PodIndex) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), x.informer.HasSynced)
}

// Synced reports whether the first list is in the index.
func (x *PodIndex) Synced() bool { return x.informer.HasSynced() }

// Pod returns the pod ns/name, if known.
func (x *PodIndex) Pod(ns, name string) (*corev1.Pod, bool) {
	obj, ok, err := x.informer.GetIndexer().GetByKey(ns + "/" + name)
	if err != nil || !ok {
		return nil, false
	}
	p, ok := obj.(*corev1.Pod)
	return p, ok
}

// PodsOnNode returns how many running or pending pods of ServiceAccount
// ns/sa are scheduled on node.
func (x *PodIndex) PodsOnNode(node, ns, sa string) int {
	objs, err := x.informer.GetIndexer().ByIndex(nodeSAIndex, nodeSAKey(node, ns, sa))
	if err != nil {
		return 0
	}
	return len(objs)
}

// Authorizer decides which identities a caller may have signed.
type Authorizer struct {
	td         spiffeid.TrustDomain
	pods       *PodIndex
	nodeAgents []types.NamespacedName
}

// NewAuthorizer returns an Authorizer for trust domain td that lets the
// ServiceAccounts nodeAgents impersonate the pods of their node.
func NewAuthorizer(td spiffeid.TrustDomain, pods *PodIndex, nodeAgents []types.NamespacedName) *Authorizer {
	return &Authorizer{td: td, pods: pods, nodeAgents: slices.Clone(nodeAgents)}
}

// Node returns the caller's node: the node of the pod its token is bound to.
// The pod must be in the index with the token's UID and ServiceAccount; when
// the token also names a node, both must agree. Anything else is refused.
func (a *Authorizer) Node(c Caller) (string, error) {
	p, ok := a.pods.Pod(c.Namespace, c.PodName)
	if !ok {
		if !a.pods.Synced() {
			return "", refuse(codes.Unavailable, ReasonNotReady, "the CA has not listed the cluster's pods yet: retry")
		}
		return "", refuse(codes.PermissionDenied, ReasonCallerPodUnknown,
			"the pod %s/%s bound to the caller's token is not known to the CA (deleted, or not seen yet: retry)", c.Namespace, c.PodName)
	}
	switch {
	case string(p.UID) != c.PodUID:
		return "", refuse(codes.PermissionDenied, ReasonCallerPodUnknown,
			"the token is bound to pod %s/%s UID %s, the pod of that name now has UID %s (recreated: the new pod's token is needed)", c.Namespace, c.PodName, c.PodUID, p.UID)
	case p.Spec.ServiceAccountName != c.ServiceAccount:
		return "", refuse(codes.PermissionDenied, ReasonCallerPodUnknown,
			"the token's ServiceAccount %s is not the ServiceAccount %s of its pod %s/%s", c.ServiceAccount, p.Spec.ServiceAccountName, c.Namespace, c.PodName)
	case p.Spec.NodeName == "":
		return "", refuse(codes.PermissionDenied, ReasonNodeUnknown, "the caller's pod %s/%s is not scheduled on a node", c.Namespace, c.PodName)
	case c.NodeName != "" && c.NodeName != p.Spec.NodeName:
		return "", refuse(codes.PermissionDenied, ReasonNodeUnknown,
			"the token says node %s, its pod %s/%s is on node %s", c.NodeName, c.Namespace, c.PodName, p.Spec.NodeName)
	}
	return p.Spec.NodeName, nil
}

// Authorize decides whether caller c, on node (from Node), may have a
// certificate for id. Its own identity is always allowed; another one only
// to a node agent and only while a pod with that identity is on its node.
func (a *Authorizer) Authorize(c Caller, node string, id identity.Identity) error {
	if id.TrustDomain != a.td {
		return refuse(codes.PermissionDenied, ReasonBadIdentity, "%s is not in trust domain %s, the only one this CA signs for", id, a.td)
	}
	if id.Namespace == c.Namespace && id.ServiceAccount == c.ServiceAccount {
		return nil
	}
	if !slices.Contains(a.nodeAgents, types.NamespacedName{Namespace: c.Namespace, Name: c.ServiceAccount}) {
		return refuse(codes.PermissionDenied, ReasonNotNodeAgent,
			"caller %s may not ask for %s: only the node agents' ServiceAccounts (%s) may impersonate", c, id, a.nodeAgentList())
	}
	if a.pods.PodsOnNode(node, id.Namespace, id.ServiceAccount) == 0 {
		return refuse(codes.PermissionDenied, ReasonNoPodOnNode,
			"no pod with ServiceAccount %s/%s is scheduled on node %s, the node of caller %s", id.Namespace, id.ServiceAccount, node, c)
	}
	return nil
}

func (a *Authorizer) nodeAgentList() string {
	if len(a.nodeAgents) == 0 {
		return "none configured"
	}
	s := ""
	for i, n := range a.nodeAgents {
		if i > 0 {
			s += ", "
		}
		s += n.String()
	}
	return s
}
