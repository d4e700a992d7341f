package localfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"

	"go.yaml.in/yaml/v3"

	"github.com/warren-mesh/warren/pkg/config"
)

// topEntry is one top-level key of a block-style file: a one-line value
// (inline) or a block list split into items.
type topEntry struct {
	key    string
	line   int
	inline []byte
	items  []chunk
}

// chunk is the text of one list item (a slice of the file), the line it
// starts on and its offset in the file.
type chunk struct {
	line  int
	start int
	text  []byte
}

// splitTop splits a block-style file into its top-level keys and their
// list items, by indentation alone. It reports false for anything else
// (flow style over several lines, a top-level list, directives or several
// documents, tabs, a key repeated), which Decode then parses as one tree.
func splitTop(data []byte) ([]topEntry, bool) {
	var top []topEntry
	var cur *topEntry
	itemCol := -1
	seen := map[string]bool{}
	// extend grows the current item to the end of the line at off: items
	// are slices of data, never copies.
	extend := func(end int) {
		if cur != nil && len(cur.items) > 0 {
			it := &cur.items[len(cur.items)-1]
			it.text = it.text[:end-it.start]
		}
	}
	for n, off := 1, 0; off < len(data); n++ {
		start := off
		line := data[off:]
		if i := bytes.IndexByte(line, '\n'); i >= 0 {
			line = line[:i+1]
		}
		off += len(line)
		body := bytes.TrimRight(line, "\r\n")
		col := 0
		for col < len(body) && body[col] == ' ' {
			col++
		}
		if col == len(body) || body[col] == '#' { // blank or comment: belongs to the item, if any
			extend(off)
			continue
		}
		if body[col] == '\t' || bytes.HasPrefix(body, []byte("---")) || bytes.HasPrefix(body, []byte("...")) || body[0] == '%' {
			return nil, false
		}
		isItem := body[col] == '-' && (col+1 == len(body) || body[col+1] == ' ')
		switch {
		case col == 0 && !isItem: // a top-level key
			key, value, ok := bytes.Cut(body, []byte(":"))
			if !ok || !plainKey(key) || (len(value) > 0 && value[0] != ' ') || seen[string(key)] {
				return nil, false
			}
			seen[string(key)] = true
			top = append(top, topEntry{key: string(key), line: n, inline: bytes.TrimSpace(value)})
			cur, itemCol = &top[len(top)-1], -1
			if len(cur.inline) > 0 && cur.inline[0] == '#' {
				cur.inline = nil
			}
			if bytes.ContainsAny(cur.inline, "&*!") { // anchors, aliases, tags: parsed as one tree
				return nil, false
			}
		case cur == nil || len(cur.inline) > 0:
			return nil, false // a top-level list, or a one-line value continued
		case isItem && (itemCol < 0 || col == itemCol):
			itemCol = col
			cur.items = append(cur.items, chunk{line: n, start: start, text: data[start:off]})
		case itemCol >= 0 && col > itemCol:
			extend(off)
		default:
			return nil, false
		}
	}
	return top, true
}

// plainKey reports whether k is a plain identifier (no quotes, flow or
// anchors to interpret).
func plainKey(k []byte) bool {
	if len(k) == 0 {
		return false
	}
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// decodeItems decodes the entries of a split file item by item. It
// reports false when an item does not parse on its own (Decode then
// parses the file as one tree, which also words the error as before).
func decodeItems(top []topEntry) (config.Config, error, bool) {
	fields := fieldsOf(reflect.TypeFor[file]())
	var unknown, shape []error
	for _, e := range top {
		if _, ok := fields[e.key]; !ok {
			unknown = append(unknown, fmt.Errorf("line %d: %s: unknown field%s", e.line, e.key, suggest(e.key, fields)))
		}
	}
	if len(unknown) > 0 {
		return config.Config{}, errors.Join(unknown...), true
	}
	budget := maxAliasNodes
	d := &decoder{}
	var c config.Config
	for _, key := range topKeys {
		for _, e := range top {
			if e.key != key {
				continue
			}
			elem := fields[key].Elem()
			if e.inline != nil { // a one-line value: [] or null, or a short flow list
				t := &treeBuilder{lines: map[string]int{}, budget: budget, offset: e.line - 1}
				var n yaml.Node
				if err := yaml.Unmarshal(e.inline, &n); err != nil {
					return config.Config{}, nil, false
				}
				v, err := t.build(&n, key, 0, false)
				if err != nil {
					return config.Config{}, err, true
				}
				budget = t.budget
				list, isList := v.([]any)
				if !isList && v != nil {
					shape = append(shape, fmt.Errorf("line %d: %s: want a list", e.line, key))
					continue
				}
				d.lines = t.lines
				for i, el := range list {
					unknownFields(el, elem, key+"["+strconv.Itoa(i)+"]", t.lines, &unknown)
					d.item(&c, key, i, el)
				}
				continue
			}
			for i, it := range e.items {
				t := &treeBuilder{lines: map[string]int{}, budget: budget, offset: it.line - 1}
				el, ok, err := t.item(it.text, key+"["+strconv.Itoa(i)+"]")
				if !ok {
					return config.Config{}, nil, false
				}
				if err != nil {
					return config.Config{}, err, true
				}
				budget = t.budget
				n := len(unknown)
				unknownFields(el, elem, key+"["+strconv.Itoa(i)+"]", t.lines, &unknown)
				if len(unknown) == n && len(unknown) == 0 {
					d.lines = t.lines
					d.item(&c, key, i, el)
				}
			}
		}
	}
	switch {
	case len(unknown) > 0:
		return config.Config{}, errors.Join(unknown...), true
	case len(shape) > 0:
		return config.Config{}, errors.Join(shape...), true
	case len(d.errs) > 0:
		return config.Config{}, errors.Join(d.errs...), true
	}
	return c, nil, true
}

// item parses the text of one list item ("- ..." and its continuation
// lines) into its JSON-like tree at path. ok is false when the text is not
// one YAML list of one item on its own.
func (t *treeBuilder) item(text []byte, path string) (el any, ok bool, err error) {
	dec := yaml.NewDecoder(bytes.NewReader(text))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		return nil, false, nil
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, false, nil
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.SequenceNode || len(doc.Content[0].Content) != 1 {
		return nil, false, nil
	}
	el, err = t.build(doc.Content[0].Content[0], path, 1, false)
	return el, true, err
}
