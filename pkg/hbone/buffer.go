package hbone

import "sync"

// chunkSize is the unit of a stream's receive buffer. An idle stream holds
// no chunk; a busy one holds at most its window's worth.
const chunkSize = 32 << 10

// chunkPool recycles receive-buffer chunks across all streams. A sync.Pool
// is a cache, not state: nothing observable depends on it.
var chunkPool = sync.Pool{New: func() any { return new([chunkSize]byte) }}

// dataBuffer is a FIFO of received DATA bytes made of pooled chunks.
type dataBuffer struct {
	chunks []*[chunkSize]byte
	r      int // read offset in chunks[0]
	w      int // write offset in the last chunk
	size   int
}

func (b *dataBuffer) Len() int { return b.size }

func (b *dataBuffer) Write(p []byte) {
	for len(p) > 0 {
		if len(b.chunks) == 0 || b.w == chunkSize {
			b.chunks = append(b.chunks, chunkPool.Get().(*[chunkSize]byte))
			b.w = 0
		}
		n := copy(b.chunks[len(b.chunks)-1][b.w:], p)
		b.w += n
		b.size += n
		p = p[n:]
	}
}

func (b *dataBuffer) Read(p []byte) int {
	n := 0
	for len(p) > 0 && b.size > 0 {
		first := b.chunks[0]
		end := chunkSize
		if len(b.chunks) == 1 {
			end = b.w
		}
		k := copy(p, first[b.r:end])
		b.r += k
		b.size -= k
		n += k
		p = p[k:]
		if b.r == end {
			chunkPool.Put(first)
			b.chunks[0] = nil
			b.chunks = b.chunks[1:]
			b.r = 0
			if len(b.chunks) == 0 {
				b.chunks = nil
				b.w = 0
			}
		}
	}
	return n
}

// release returns every chunk to the pool and reports how many unread bytes were dropped.
func (b *dataBuffer) release() int {
	n := b.size
	for i, c := range b.chunks {
		chunkPool.Put(c)
		b.chunks[i] = nil
	}
	*b = dataBuffer{}
	return n
}
