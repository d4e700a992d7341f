package cluster

import (
	"context"
	"net"
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// clusterDomain is the cluster's DNS domain (the kubelet's clusterDomain).
const clusterDomain = "cluster.local."

// startDNS serves the cluster's DNS on NodeIP:53 (the kubelet's clusterDNS),
// as CoreDNS does on a normal cluster, for what the tests need: A records of
// Services' cluster IPs (<svc>.<ns>.svc.cluster.local). It is authoritative
// and recursive for nothing: any other name gets NXDOMAIN (inside
// cluster.local) or REFUSED, so no query ever leaves the machine.
func (c *Cluster) startDNS(ctx context.Context) error {
	addr := net.JoinHostPort(NodeIP.String(), "53")
	pc, err := net.ListenPacket("udp4", addr)
	if err != nil {
		return err
	}
	c.closers = append(c.closers, pc.Close)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp := c.answer(ctx, buf[:n]); resp != nil {
				pc.WriteTo(resp, from)
			}
		}
	}()
	return nil
}

func (c *Cluster) answer(ctx context.Context, req []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return nil
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired}
	name := strings.ToLower(q.Name.String())
	var ip netip.Addr
	switch {
	case !strings.HasSuffix(name, "."+clusterDomain):
		rh.RCode = dnsmessage.RCodeRefused
	default:
		rh.Authoritative = true
		rh.RCode = dnsmessage.RCodeNameError
		labels := strings.Split(strings.TrimSuffix(name, "."+clusterDomain), ".")
		if len(labels) == 3 && labels[2] == "svc" {
			svc, err := c.Kube.CoreV1().Services(labels[1]).Get(ctx, labels[0], metav1.GetOptions{})
			switch {
			case err == nil:
				rh.RCode = dnsmessage.RCodeSuccess
				if a, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil && a.Is4() {
					ip = a
				}
			case !apierrors.IsNotFound(err):
				rh.RCode = dnsmessage.RCodeServerFailure
			}
		}
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	b.StartQuestions()
	b.Question(q)
	b.StartAnswers()
	if ip.IsValid() && (q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL) {
		b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: ip.As4()})
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}
