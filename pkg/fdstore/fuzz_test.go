package fdstore

import (
	"encoding/binary"
	"log/slog"
	"testing"
	"time"
)

// Whatever bytes a client sends, the holder answers with well-formed
// replies or hangs up, and goes on serving.
func FuzzRequests(f *testing.F) {
	frame := func(body string) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
	}
	f.Add(frame(`{"op":"hello"}`))
	f.Add(frame(`{"op":"list","prefix":"netns/"}`))
	f.Add(append(frame(`{"op":"get","key":"k"}`), frame(`{"op":"delete_prefix","prefix":""}`)...))
	f.Add(frame(`{"op":"put","key":"k","fds":1}`))
	f.Add(frame(`{"op":"takeover","holder":{"id":"x"}}`))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{0, 0, 0, 0})
	path := sockPath(f)
	srv := startAt(f, path, Config{Logger: slog.New(slog.DiscardHandler), MaxConns: 64})
	f.Fuzz(func(t *testing.T, in []byte) {
		fc := rawDial(t, path)
		fc.c.SetDeadline(time.Now().Add(5 * time.Second))
		fc.c.Write(in)
		fc.c.CloseWrite()
		for {
			r, fds, err := readReply(fc)
			if err != nil {
				break
			}
			closeFDs(fds)
			if !r.OK && r.Code == "" {
				t.Fatalf("error reply without a code: %+v", r)
			}
		}
		fc.close()
		c, err := Dial(t.Context(), path)
		if err != nil {
			t.Fatalf("holder stopped serving: %v", err)
		}
		c.Close()
		if srv.Len() != 0 {
			t.Fatalf("a put without an fd was taken: %d entries", srv.Len())
		}
	})
}
