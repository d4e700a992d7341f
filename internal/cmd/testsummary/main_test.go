package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestSummarise(t *testing.T) {
	in := strings.Join([]string{
		`{"Action":"run","Package":"p","Test":"TestA"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN TestA\n"}`,
		`{"Action":"pass","Package":"p","Test":"TestA","Elapsed":0.1}`,
		`{"Action":"output","Package":"p","Test":"TestB","Output":"    b_test.go:3: needs root\n"}`,
		`{"Action":"skip","Package":"p","Test":"TestB"}`,
		`{"Action":"output","Package":"p","Test":"TestC","Output":"    c_test.go:9: boom\n"}`,
		`{"Action":"fail","Package":"p","Test":"TestC","Elapsed":0.2}`,
		`{"Action":"fail","Package":"p","Elapsed":0.3}`,
		`# build error line`,
	}, "\n")
	var out, raw bytes.Buffer
	total, code := summarise(strings.NewReader(in), &out, &raw, counts{Passed: 2})
	if code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
	s := out.String()
	for _, want := range []string{"tests: 3 passed, 1 failed, 1 skipped\n", "SKIP p.TestB: b_test.go:3: needs root", "boom", "# build error line"} {
		if !strings.Contains(s, want) {
			t.Errorf("summary lacks %q:\n%s", want, s)
		}
	}
	if total != (counts{3, 1, 1}) {
		t.Errorf("total %+v", total)
	}
	var ok bytes.Buffer
	if _, code := summarise(strings.NewReader(`{"Action":"pass","Package":"p","Test":"T"}`), &ok, &raw, counts{}); code != 0 {
		t.Errorf("all-pass exit %d", code)
	}
}
