package bench

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/warren-mesh/warren/tests/lab"
)

// The HAProxy pair's ports, laid out as the stunnel pair's: the server end
// accepts TLS on haproxyTLS+i in the server pod and connects to the app on
// appPorts[i] over loopback; the client end accepts plaintext on
// haproxyLocal+i in the client pod.
const (
	haproxyTLS   = 9543
	haproxyLocal = 19200
)

// haproxyPair is a HAProxy client end and server end, each in its pod's
// netns, in TCP mode: the second classic-tunnel anchor. It reuses the
// stunnel pair's CA and certificates.
type haproxyPair struct {
	bin            string
	dir            string
	client, server *lab.Pod
	cli, srv       *lab.Process
}

// haproxyVersion returns HAProxy's version, or "" when it is missing.
func haproxyVersion(bin string) string {
	out, err := exec.Command(bin, "-v").CombinedOutput()
	if err != nil {
		return ""
	}
	if m := regexp.MustCompile(`HAProxy version (\S+)`).FindSubmatch(out); m != nil {
		return "HAProxy " + string(m[1])
	}
	return ""
}

// newHAProxyPair writes both configurations into dir, which holds the
// tunnel pair's ca.pem, server.pem/.key and client.pem/.key. Both ends: TLS
// 1.3 only with AES-128-GCM, mutual certificate verification (the server
// requires a client certificate from the CA, the client verifies the
// server's chain and name), one TLS connection per TCP connection (TCP
// mode: each accepted connection gets its own upstream connection).
// maxConn covers the idle scenario; noFile is the descriptor limit each
// end runs with (HAProxy refuses to start if maxconn needs more).
func newHAProxyPair(bin, dir string, client, server *lab.Pod, appPorts []int, maxConn, noFile int) (*haproxyPair, error) {
	// HAProxy takes certificate and key in one file.
	for _, name := range []string{"server", "client"} {
		cert, err := os.ReadFile(filepath.Join(dir, name+".pem"))
		if err != nil {
			return nil, fmt.Errorf("haproxy pair: %w", err)
		}
		key, err := os.ReadFile(filepath.Join(dir, name+".key"))
		if err != nil {
			return nil, fmt.Errorf("haproxy pair: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, name+"-haproxy.pem"), append(cert, key...), 0o600); err != nil {
			return nil, fmt.Errorf("haproxy pair: %w", err)
		}
	}
	ca := filepath.Join(dir, "ca.pem")
	global := fmt.Sprintf("global\n  maxconn %d\n  ulimit-n %d\n"+
		"defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n  maxconn %d\n", maxConn+100, noFile, maxConn+100)
	tls := "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256"
	var srv, cli strings.Builder
	srv.WriteString(global)
	cli.WriteString(global)
	for i, port := range appPorts {
		fmt.Fprintf(&srv, "listen app%d\n  bind %s ssl crt %s ca-file %s verify required %s\n  server app 127.0.0.1:%d\n",
			port, netip.AddrPortFrom(server.IPv4(), uint16(haproxyTLS+i)), filepath.Join(dir, "server-haproxy.pem"), ca, tls, port)
		fmt.Fprintf(&cli, "listen app%d\n  bind 127.0.0.1:%d\n  server tls %s ssl crt %s ca-file %s verify required verifyhost server.bench sni str(server.bench) %s\n",
			port, haproxyLocal+i, netip.AddrPortFrom(server.IPv4(), uint16(haproxyTLS+i)), filepath.Join(dir, "client-haproxy.pem"), ca, tls)
	}
	if err := os.WriteFile(filepath.Join(dir, "haproxy-server.cfg"), []byte(srv.String()), 0o600); err != nil {
		return nil, fmt.Errorf("haproxy pair: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "haproxy-client.cfg"), []byte(cli.String()), 0o600); err != nil {
		return nil, fmt.Errorf("haproxy pair: %w", err)
	}
	return &haproxyPair{bin: bin, dir: dir, client: client, server: server}, nil
}

// start runs both ends in the foreground (-db) and waits until each accepts connections.
func (h *haproxyPair) start(appPorts []int) error {
	var err error
	if h.srv, err = h.server.Start(h.bin, "-db", "-f", filepath.Join(h.dir, "haproxy-server.cfg")); err != nil {
		return fmt.Errorf("start haproxy server end: %w", err)
	}
	if h.cli, err = h.client.Start(h.bin, "-db", "-f", filepath.Join(h.dir, "haproxy-client.cfg")); err != nil {
		return fmt.Errorf("start haproxy client end: %w", err)
	}
	for i := range appPorts {
		if err := waitListen(h.server, netip.AddrPortFrom(h.server.IPv4(), uint16(haproxyTLS+i)), h.srv); err != nil {
			return err
		}
		if err := waitListen(h.client, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(haproxyLocal+i)), h.cli); err != nil {
			return err
		}
	}
	return nil
}

// stop stops both ends.
func (h *haproxyPair) stop() {
	for _, p := range []*lab.Process{h.cli, h.srv} {
		if p != nil {
			p.Stop()
		}
	}
	h.cli, h.srv = nil, nil
}
