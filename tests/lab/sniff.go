package lab

import (
	"bytes"
	"errors"
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Sniffer records every frame that crosses a node's underlay link: what a
// packet capture on the wire between nodes would show.
type Sniffer struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	done   chan struct{}
}

// SniffUnderlay starts capturing the frames that node n sends and receives on
// the underlay (its port n<i> on the underlay bridge), through an AF_PACKET
// socket opened inside the underlay namespace: the wire between nodes.
func (l *Lab) SniffUnderlay(n *Node) (*Sniffer, error) {
	var fd int
	err := inNetNS(l.underlay, func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lab: sniff: %w", err)
	}
	port := fmt.Sprintf("n%d", n.index)
	idx, err := l.underlayIndex(port)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: idx}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lab: sniff: bind %s: %w", port, err)
	}
	// Bounded: a read timeout lets Stop end the loop.
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	s := &Sniffer{fd: fd, done: make(chan struct{})}
	go s.loop()
	return s, nil
}

func (s *Sniffer) loop() {
	defer close(s.done)
	buf := make([]byte, 256*1024)
	for {
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				s.mu.Lock()
				stopped := s.fd < 0
				s.mu.Unlock()
				if stopped {
					return
				}
				continue
			}
			return
		}
		s.mu.Lock()
		s.frames = append(s.frames, bytes.Clone(buf[:n]))
		s.mu.Unlock()
	}
}

// Stop ends the capture and returns the frames seen.
func (s *Sniffer) Stop() [][]byte {
	s.mu.Lock()
	fd := s.fd
	s.fd = -1
	s.mu.Unlock()
	<-s.done
	if fd >= 0 {
		unix.Close(fd)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.frames
}

func (l *Lab) underlayIndex(name string) (int, error) {
	h, err := netlink.NewHandleAt(l.underlay)
	if err != nil {
		return 0, fmt.Errorf("lab: netlink in underlay: %w", err)
	}
	defer h.Close()
	link, err := h.LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("lab: find %s: %w", name, err)
	}
	return link.Attrs().Index, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
