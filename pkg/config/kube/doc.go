// Package kube is the Kubernetes configuration provider: client-go informers
// on the API server feed warren's one model (github.com/warren-mesh/warren/pkg/config)
// exactly as the local file does, and the result is published to the store.
//
// # What is watched
//
//   - Pods on this node, with the field selector spec.nodeName=<node>: they
//     are the candidates for enrollment, the pods this agent annotates and
//     whose network namespaces it finds.
//   - Every other pod, cluster-wide, stripped by an informer transform to the
//     fields the model needs (labels, service account, IPs, node, readiness):
//     a client must know that a remote destination is in the mesh, and under
//     which identity, to tunnel to it.
//   - Namespaces (the opt-in label), Services and EndpointSlices (VIPs, ports,
//     target ports, endpoints), and Istio's security.istio.io/v1
//     AuthorizationPolicy and PeerAuthentication through the typed clients of
//     istio.io/client-go.
//
// # Enrollment
//
// A pod is in the mesh (protocol HBONE) when its namespace carries the
// enrollment label (default istio.io/dataplane-mode=ambient), its own label
// is not istio.io/dataplane-mode=none, it is not hostNetwork and it has an
// IP. A change of these inputs updates the pods it reaches (see Incremental
// updates): label flips enroll and unenroll pods live. Pods outside the
// mesh are still published (protocol TCP) so that traffic to them passes
// through as plain TCP. Each local pod in the mesh is annotated
// ambient.istio.io/redirection=enabled once the snapshot enrolling it is
// published, as Istio's CNI agent does, and the annotation is removed when
// it leaves the mesh; istiod uses it to advertise the pod as HBONE.
//
// # Incremental updates
//
// The first snapshot is a full conversion of the informer caches
// (config.NewSnapshot). After it, informer events are gathered (debounced,
// Options.Debounce) as the keys they may change, and each batch recomputes
// only what those keys reach, each item from the caches alone, compares it
// with the last published snapshot and publishes the difference as one
// config.Delta (config.Snapshot.Apply):
//
//   - a Pod: its workload, and the workloads of the pods sharing one of its
//     old or new addresses (the newest pod owns an address);
//   - a Namespace whose enrollment label value changes: its pods;
//   - a Service: the service, and the workloads its EndpointSlices list;
//   - an EndpointSlice: the workloads its old and new versions list;
//   - an AuthorizationPolicy: the policy, and the workloads its old or new
//     selector matches (in its namespace; in every namespace for a policy
//     of the root namespace, which costs a label match per pod);
//   - a PeerAuthentication: the namespace and mesh modes, and the workloads
//     its old or new selector matches.
//
// This node's pods are recomputed with every batch (their network
// namespaces are found outside the informers). To find what an event
// reaches, the provider indexes pods by address and EndpointSlices by pod
// and by service in the informers' stores; the published snapshot is the
// only copy of the converted model. TestIncrementalEqualsRebuild checks
// that random sequences of events give, batch after batch, the snapshot a
// full conversion of the same caches gives. An item Apply rejects keeps
// its previous version (or absence), is reported in Status.LastError and is
// retried with the next batch; other items are applied. The only full
// rebuild is the first snapshot (retried whole until it is published):
// the mesh-wide settings (trust domain, cluster ID, DNS domain, root
// namespace, enrollment label) are options, fixed for the provider's life.
//
// # Finding a pod's network namespace
//
// The agent runs with hostPID and reads the host's /proc (ProcResolver): for
// each process, /proc/<pid>/cgroup names the pod's cgroup, whose path holds
// the pod UID with the cgroupfs driver (".../pod<uid>/<container>") or with
// the systemd driver ("...-pod<uid with _>.slice/..."). The oldest process of
// the pod (the sandbox "pause" process, which lives as long as the pod) gives
// /proc/<pid>/ns/net; when a bind mount of the same namespace exists under
// /var/run/netns (containerd and CRI-O create one per sandbox) that stable
// path is used instead. This needs no CRI socket, works with every container
// runtime and CNI, and costs one scan of /proc per batch that has local
// pods still to resolve (results are cached per pod UID and rechecked).
//
// The race: the API server learns a pod's IP only after its sandbox exists,
// so the pause process is normally there when the pod first shows up with an
// IP, but the app containers start without waiting for warren (there is no
// CNI hook). Between a container's start and enrollment (informer latency,
// the /proc scan, binding listeners and writing the BPF map: tens of
// milliseconds) the pod's first connections are not captured and leave in
// plaintext straight to their destination. They never reach a STRICT
// destination in plaintext: an enrolled destination's sk_lookup program
// steers plaintext to its 15006 listener, which refuses it under STRICT (the
// client sees a reset and retries, now captured), and a destination on
// another node reached by a tunnel is unaffected. A PERMISSIVE destination
// accepts them as plaintext, as Istio does. A local pod whose namespace
// cannot be found yet is published as not in the mesh and retried every
// RetryInterval; other nodes already see it as HBONE and tunnel to its
// 15008, which refuses until the listeners exist, so no plaintext reaches it
// either.
//
// # The built-in CA's Secret
//
// With --ca-provider=builtin the chart creates the CA's Secret (warren-ca,
// in the release namespace; Istio's plug-in CA layout: ca-cert.pem,
// ca-key.pem, root-cert.pem, cert-chain.pem) at install with a generated
// self-signed ECDSA P-256 root, keeps it on upgrade and uninstall
// (helm.sh/resource-policy: keep), or uses an operator-created Secret named
// by ca.existingSecret, and mounts it read-only at the agent's --ca-dir. The
// agent never reads Secrets through the API (its RBAC has no Secret access).
package kube
