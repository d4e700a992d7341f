package scale

import (
	"bufio"
	"bytes"
	"fmt"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"sync"
	"time"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/localfile"
)

// FileReport is the local-file provider's figures for the mesh as one file.
type FileReport struct {
	MB        float64 `json:"file_mb"`
	WallS     float64 `json:"parse_wall_s"`
	CPUS      float64 `json:"parse_cpu_s"`
	PeakMiB   float64 `json:"parse_peak_heap_mib"`
	ResultMiB float64 `json:"snapshot_heap_mib"`
}

// YAML writes the mesh at generation 0 as a local-file configuration
// (ztunnel's LOCAL_XDS_PATH shape, block style, one key a line).
func (m *Mesh) YAML() []byte {
	m.defaults()
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	fmt.Fprintln(w, "# tests/scale synthetic mesh")
	fmt.Fprintln(w, "policies:")
	for k := range m.Policies {
		p := m.Policy(k)
		fmt.Fprintf(w, "- name: %s\n  namespace: %s\n  scope: %s\n  action: %s\n  rules:\n", p.Name, p.Namespace, p.Scope, p.Action)
		for _, rule := range p.Rules {
			m := rule[0][0]
			var parts []string
			if len(m.Principals) > 0 {
				parts = append(parts, fmt.Sprintf("principals: [%q]", m.Principals[0].String()))
			}
			if len(m.Namespaces) > 0 {
				parts = append(parts, fmt.Sprintf("namespaces: [%q]", m.Namespaces[0].String()))
			}
			if len(m.DestinationPorts) > 0 {
				parts = append(parts, fmt.Sprintf("destinationPorts: [%d]", m.DestinationPorts[0]))
			}
			fmt.Fprintf(w, "  - [[{%s}]]\n", strings.Join(parts, ", "))
		}
	}
	fmt.Fprintln(w, "services:")
	for j := range m.Services {
		s := m.Service(j)
		var vips []string
		for _, v := range s.VIPs {
			vips = append(vips, fmt.Sprintf("%q", v.String()))
		}
		fmt.Fprintf(w, "- name: %s\n  namespace: %s\n  hostname: %s\n  vips: [%s]\n  ports: {80: 8080, 443: 8443, 8081: 8081, 9090: 9090, 15020: 15020}\n",
			s.Name, s.Namespace, s.Hostname, strings.Join(vips, ", "))
	}
	fmt.Fprintln(w, "workloads:")
	for i := range m.Workloads {
		wl := m.Workload(i, 0)
		var ips []string
		for _, ip := range wl.WorkloadIPs {
			ips = append(ips, fmt.Sprintf("%q", ip.String()))
		}
		fmt.Fprintf(w, "- uid: %s\n  name: %s\n  namespace: %s\n  trustDomain: %s\n  serviceAccount: %s\n  workloadIps: [%s]\n  protocol: HBONE\n  node: %s\n",
			wl.UID, wl.Name, wl.Namespace, wl.TrustDomain, wl.ServiceAccount, strings.Join(ips, ", "), wl.Node)
		fmt.Fprintf(w, "  clusterId: %s\n  workloadName: %s\n  workloadType: %s\n  canonicalName: %s\n  canonicalRevision: %s\n  locality: {region: %s, zone: %s}\n",
			wl.ClusterID(), wl.WorkloadName(), wl.WorkloadType(), wl.CanonicalName(), wl.CanonicalRevision(), wl.Locality().Region, wl.Locality().Zone)
		for key := range wl.Services {
			fmt.Fprintf(w, "  services:\n    %s: {}\n", key)
		}
		if len(wl.AuthorizationPolicies) > 0 {
			fmt.Fprintf(w, "  authorizationPolicies: [%s]\n", wl.AuthorizationPolicies[0])
		}
		if wl.NetnsPath() != "" {
			fmt.Fprintf(w, "  netnsPath: %s\n", wl.NetnsPath())
		}
	}
	w.Flush()
	return b.Bytes()
}

// ParseFile measures the local-file provider's parse and validation of
// the mesh as one file: time, CPU and the peak of the live heap (sampled
// every 5 ms, the file's bytes included).
func ParseFile(m Mesh) (*FileReport, error) {
	base, _ := settle()
	data := m.YAML()
	r := &FileReport{MB: float64(len(data)) / 1e6}
	stop := make(chan struct{})
	var peak uint64
	var wg sync.WaitGroup
	wg.Go(func() {
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(s)
			peak = max(peak, s[0].Value.Uint64())
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	})
	cpu0, t0 := cpuTime(), time.Now()
	snap, err := localfile.Parse(data, config.Options{Node: LocalNode, CheckNetns: okPath, CheckCgroup: okPath})
	r.WallS, r.CPUS = time.Since(t0).Seconds(), (cpuTime() - cpu0).Seconds()
	close(stop)
	wg.Wait()
	if err != nil {
		return nil, fmt.Errorf("parse the mesh file: %w", err)
	}
	if snap.NumWorkloads() != m.Workloads {
		return nil, fmt.Errorf("parse the mesh file: %d workloads, want %d", snap.NumWorkloads(), m.Workloads)
	}
	r.PeakMiB = float64(peak)/mib - base
	runtime.KeepAlive(data) // the provider drops the file once parsed
	heap, _ := settle()
	r.ResultMiB = heap - base
	runtime.KeepAlive(snap)
	debug.FreeOSMemory()
	return r, nil
}
