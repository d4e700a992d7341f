package config

import (
	"fmt"
	"strings"
	"testing"
	"unsafe"
)

func TestIntern(t *testing.T) {
	a := Intern(strings.Clone("ns-intern-test"))
	b := Intern(strings.Clone("ns-intern-test"))
	if a != "ns-intern-test" || unsafe.StringData(a) != unsafe.StringData(b) {
		t.Fatal("equal values interned to different copies")
	}
	if Intern("") != "" {
		t.Fatal("empty string")
	}
	// Past the limit the table starts afresh: it never holds more.
	for i := range internLimit + 10 {
		Intern(fmt.Sprint("v-", i))
	}
	interned.mu.RLock()
	n := len(interned.m)
	interned.mu.RUnlock()
	if n > internLimit || n == 0 {
		t.Fatalf("table holds %d values, limit %d", n, internLimit)
	}
	if c := Intern(strings.Clone("ns-intern-test")); c != a {
		t.Fatal("a value interned again after the reset changed")
	}
}

func TestInternList(t *testing.T) {
	one := internList([]string{strings.Clone("ns/p")})
	again := internList([]string{strings.Clone("ns/p")})
	if len(one) != 1 || &one[0] != &again[0] {
		t.Fatal("one-key lists are not shared")
	}
	two := internList([]string{"ns/p", "ns/q"})
	if unsafe.StringData(two[0]) != unsafe.StringData(one[0]) {
		t.Fatal("the keys of a longer list are not interned")
	}
	if internList(nil) != nil {
		t.Fatal("nil list")
	}
}
