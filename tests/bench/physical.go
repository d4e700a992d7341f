package bench

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"syscall"
	"time"
)

// Physical is the machine's raw capacity, the context of the paths' figures.
type Physical struct {
	// AESGCMSealBytesPerS is AES-128-GCM Seal of 16 KiB records on one core.
	AESGCMSealBytesPerS float64 `json:"aes128gcm_seal_bytes_per_s_per_core"`
	// TLSBytesPerCPUS is application bytes through a crypto/tls 1.3
	// AES-128-GCM connection (over a unix socketpair) per CPU-second spent
	// by both ends together: seal, open, record framing and socket copies.
	TLSBytesPerCPUS float64 `json:"tls13_aes128gcm_bytes_per_cpu_s"`
	// TLSBytesPerS is the same connection's wall-clock throughput.
	TLSBytesPerS float64 `json:"tls13_aes128gcm_bytes_per_s"`
	// VethTCPBytesPerS is one plain TCP stream between the two node
	// namespaces over the lab's underlay veths and bridge.
	VethTCPBytesPerS float64 `json:"veth_tcp_bytes_per_s"`
}

// measureAESGCM seals 16 KiB records on one goroutine for d.
func measureAESGCM(d time.Duration) float64 {
	key := make([]byte, 16)
	block, _ := aes.NewCipher(key)
	gcm, _ := cipher.NewGCM(block)
	nonce := make([]byte, gcm.NonceSize())
	buf := make([]byte, 16<<10, 16<<10+gcm.Overhead())
	var n int64
	start := time.Now()
	for time.Since(start) < d {
		for i := 0; i < 64; i++ {
			gcm.Seal(buf[:0], nonce, buf[:16<<10], nil)
			n += 16 << 10
		}
	}
	return float64(n) / time.Since(start).Seconds()
}

// measureTLS pushes bytes through a TLS 1.3 connection over a unix
// socketpair for d and reports bytes per wall second and per CPU-second of
// this process (both ends run here; nothing else in the process is busy).
func measureTLS(d time.Duration) (perS, perCPUS float64, err error) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench"},
		DNSNames: []string{"bench"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return 0, 0, fmt.Errorf("tls context certificate: %w", err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("socketpair: %w", err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "tls-context")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return 0, 0, fmt.Errorf("socketpair conn: %w", err)
		}
		defer c.Close()
		conns[i] = c
	}
	pool := x509.NewCertPool()
	leaf, _ := x509.ParseCertificate(der)
	pool.AddCert(leaf)
	srv := tls.Server(conns[0], &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	cli := tls.Client(conns[1], &tls.Config{RootCAs: pool, ServerName: "bench", MinVersion: tls.VersionTLS13})
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		return 0, 0, fmt.Errorf("tls context handshake: %w", err)
	}
	if err := <-errc; err != nil {
		return 0, 0, fmt.Errorf("tls context handshake: %w", err)
	}
	if cs := cli.ConnectionState().CipherSuite; cs != tls.TLS_AES_128_GCM_SHA256 {
		return 0, 0, fmt.Errorf("tls context negotiated %s, want AES-128-GCM", tls.CipherSuiteName(cs))
	}
	got := make(chan int64, 1)
	go func() {
		n, _ := io.CopyBuffer(io.Discard, srv, make([]byte, 256<<10))
		got <- n
	}()
	buf := make([]byte, 256<<10)
	cpu0, start := selfCPU(), time.Now()
	for time.Since(start) < d {
		if _, err := cli.Write(buf); err != nil {
			return 0, 0, fmt.Errorf("tls context write: %w", err)
		}
	}
	cli.CloseWrite()
	n := <-got
	wall, cpu := time.Since(start).Seconds(), (selfCPU() - cpu0).Seconds()
	return float64(n) / wall, float64(n) / cpu, nil
}
