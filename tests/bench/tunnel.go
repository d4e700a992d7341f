package bench

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/warren-mesh/warren/tests/lab"
)

// The tunnel pair's ports: the stunnel server accepts TLS on tunnelTLS+i in
// the server pod and connects to the app on appPorts[i] over loopback; the
// stunnel client accepts plaintext on tunnelLocal+i in the client pod.
const (
	tunnelTLS   = 9443
	tunnelLocal = 19100
)

// tunnelPair is a stunnel4 client and server, each in its pod's netns.
type tunnelPair struct {
	bin            string
	dir            string
	client, server *lab.Pod
	cli, srv       *lab.Process
}

// stunnelVersion returns stunnel's version line, or "" when it is missing.
func stunnelVersion(bin string) string {
	out, _ := exec.Command(bin, "-version").CombinedOutput()
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "stunnel ") {
			return strings.TrimSpace(line)
		}
	}
	return ""
}

// newTunnelPair writes an ECDSA P-256 CA, a server and a client certificate
// and both configurations into dir.
func newTunnelPair(bin, dir string, client, server *lab.Pod, appPorts []int) (*tunnelPair, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench tunnel CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create tunnel CA: %w", err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	if err := writePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER); err != nil {
		return nil, err
	}
	for i, leaf := range []struct {
		name string
		ip   netip.Addr
		ext  x509.ExtKeyUsage
	}{{"server", server.IPv4(), x509.ExtKeyUsageServerAuth}, {"client", client.IPv4(), x509.ExtKeyUsageClientAuth}} {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: leaf.name + ".bench"},
			DNSNames: []string{leaf.name + ".bench"}, IPAddresses: []net.IP{leaf.ip.AsSlice()},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{leaf.ext},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, fmt.Errorf("create %s certificate: %w", leaf.name, err)
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		if err := writePEM(filepath.Join(dir, leaf.name+".pem"), "CERTIFICATE", der); err != nil {
			return nil, err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".key"), "EC PRIVATE KEY", kder); err != nil {
			return nil, err
		}
	}
	// Both ends: TLS 1.3 only, AES-128-GCM (what Go negotiates for HBONE
	// on AES hardware), TCP_NODELAY as Go and Envoy set it. The default
	// TIMEOUTclose stays: it is what lets a half-close pass (stunnel sends
	// close_notify and keeps reading until the peer's).
	common := fmt.Sprintf("CAfile = %s\nverifyChain = yes\nsslVersionMin = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\n"+
		"socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n", filepath.Join(dir, "ca.pem"))
	global := "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
	var srv, cli strings.Builder
	srv.WriteString(global)
	cli.WriteString(global)
	for i, port := range appPorts {
		fmt.Fprintf(&srv, "[app%d]\naccept = %s\nconnect = 127.0.0.1:%d\ncert = %s\nkey = %s\nrequireCert = yes\n%s",
			port, netip.AddrPortFrom(server.IPv4(), uint16(tunnelTLS+i)), port,
			filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"), common)
		fmt.Fprintf(&cli, "[app%d]\nclient = yes\naccept = 127.0.0.1:%d\nconnect = %s\ncert = %s\nkey = %s\ncheckHost = server.bench\n%s",
			port, tunnelLocal+i, netip.AddrPortFrom(server.IPv4(), uint16(tunnelTLS+i)),
			filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key"), common)
	}
	if err := os.WriteFile(filepath.Join(dir, "server.conf"), []byte(srv.String()), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "client.conf"), []byte(cli.String()), 0o600); err != nil {
		return nil, err
	}
	return &tunnelPair{bin: bin, dir: dir, client: client, server: server}, nil
}

func writePEM(path, typ string, der []byte) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// start runs both ends and waits until each accepts connections.
func (t *tunnelPair) start(appPorts []int) error {
	var err error
	if t.srv, err = t.server.Start(t.bin, filepath.Join(t.dir, "server.conf")); err != nil {
		return err
	}
	if t.cli, err = t.client.Start(t.bin, filepath.Join(t.dir, "client.conf")); err != nil {
		return err
	}
	for i := range appPorts {
		if err := waitListen(t.server, netip.AddrPortFrom(t.server.IPv4(), uint16(tunnelTLS+i)), t.srv); err != nil {
			return err
		}
		if err := waitListen(t.client, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(tunnelLocal+i)), t.cli); err != nil {
			return err
		}
	}
	return nil
}

// stop stops both ends.
func (t *tunnelPair) stop() {
	for _, p := range []*lab.Process{t.cli, t.srv} {
		if p != nil {
			p.Stop()
		}
	}
	t.cli, t.srv = nil, nil
}

// waitListen waits until something accepts TCP on addr inside pod.
func waitListen(pod *lab.Pod, addr netip.AddrPort, proc *lab.Process) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-proc.Done():
			return fmt.Errorf("%s exited before listening on %s: %v", pod.Name(), addr, proc.Wait())
		default:
		}
		err := pod.Do(func() error {
			c, err := net.DialTimeout("tcp", addr.String(), time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on %s in %s:\n%s", addr, pod.Name(), proc.Output())
}
