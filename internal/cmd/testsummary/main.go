// Command testsummary reads `go test -json` on standard input, prints a
// readable log (each test's result, skip reasons, the full output of failures,
// package results) and a closing line "N passed, N failed, N skipped". It
// writes the raw output to -o and exits non-zero when a test or a package failed.
// With -carry FILE, the counts of earlier runs stored in FILE are added in, so
// the closing line of the last run in a session gives the totals.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

type key struct{ pkg, test string }

func main() {
	logPath := flag.String("o", "", "file for the raw test output")
	carry := flag.String("carry", "", "file that carries the counts across runs")
	report := flag.String("report", "", "print the totals carried in this file and exit")
	flag.Parse()
	if *report != "" {
		var total counts
		b, err := os.ReadFile(*report)
		if err == nil {
			err = json.Unmarshal(b, &total)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsummary: no test totals:", err)
			os.Exit(2)
		}
		fmt.Printf("\ntests: %d passed, %d failed, %d skipped\n", total.Passed, total.Failed, total.Skipped)
		return
	}
	var raw io.Writer = io.Discard
	if *logPath != "" {
		os.MkdirAll(filepath.Dir(*logPath), 0o755)
		f, err := os.Create(*logPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
		defer f.Close()
		raw = f
	}
	var prev counts
	if *carry != "" {
		if b, err := os.ReadFile(*carry); err == nil {
			json.Unmarshal(b, &prev)
		}
	}
	total, code := summarise(os.Stdin, os.Stdout, raw, prev)
	if *carry != "" {
		b, _ := json.Marshal(total)
		if err := os.WriteFile(*carry, b, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
	}
	os.Exit(code)
}

// counts are the test results of one or more runs.
type counts struct{ Passed, Failed, Skipped int }

func summarise(in io.Reader, out, raw io.Writer, prev counts) (counts, int) {
	outputs := map[key]*strings.Builder{}
	var passed, failed, skipped, pkgFailed int
	var failures []string
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	start := time.Now()
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			// Build errors and other non-JSON lines go through as they are.
			fmt.Fprintln(out, string(line))
			fmt.Fprintln(raw, string(line))
			continue
		}
		k := key{e.Package, e.Test}
		switch e.Action {
		case "output":
			fmt.Fprint(raw, e.Output)
			b := outputs[k]
			if b == nil {
				b = &strings.Builder{}
				outputs[k] = b
			}
			b.WriteString(e.Output)
		case "pass", "fail", "skip":
			if e.Test == "" {
				if e.Action == "fail" {
					pkgFailed++
					if b := outputs[k]; b != nil && !strings.Contains(b.String(), "--- FAIL") {
						fmt.Fprint(out, b.String())
					}
				}
				fmt.Fprintf(out, "%-4s %s (%.1fs)\n", map[string]string{"pass": "ok", "fail": "FAIL", "skip": "?"}[e.Action], e.Package, e.Elapsed)
				break
			}
			name := shortPkg(e.Package) + "." + e.Test
			switch e.Action {
			case "pass":
				passed++
				if !strings.Contains(e.Test, "/") {
					fmt.Fprintf(out, "  PASS %s (%.2fs)\n", name, e.Elapsed)
				}
			case "skip":
				skipped++
				fmt.Fprintf(out, "  SKIP %s: %s\n", name, skipReason(outputs[k]))
			case "fail":
				failed++
				failures = append(failures, name)
				fmt.Fprintf(out, "  FAIL %s (%.2fs)\n", name, e.Elapsed)
				if b := outputs[k]; b != nil {
					fmt.Fprint(out, indent(b.String()))
				}
			}
			delete(outputs, k)
		}
	}
	if len(failures) > 0 {
		fmt.Fprintf(out, "\nfailed tests:\n  %s\n", strings.Join(failures, "\n  "))
	}
	if pkgFailed > 0 && failed == 0 {
		// A package that fails without a failing test (build error, panic in TestMain) still fails the run.
		failed = pkgFailed
	}
	fmt.Fprintf(out, "\nthis run: %d passed, %d failed, %d skipped in %s\n", passed, failed, skipped, time.Since(start).Round(time.Second))
	total := counts{prev.Passed + passed, prev.Failed + failed, prev.Skipped + skipped}
	fmt.Fprintf(out, "tests: %d passed, %d failed, %d skipped\n", total.Passed, total.Failed, total.Skipped)
	if failed > 0 || pkgFailed > 0 {
		return total, 1
	}
	return total, 0
}

func shortPkg(p string) string { return strings.TrimPrefix(p, "github.com/warren-mesh/warren/") }

func skipReason(b *strings.Builder) string {
	if b == nil {
		return ""
	}
	var reasons []string
	for _, l := range strings.Split(b.String(), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "=== ") || strings.HasPrefix(l, "--- SKIP") {
			continue
		}
		reasons = append(reasons, l)
	}
	return strings.Join(reasons, " | ")
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("      " + l + "\n")
	}
	return b.String()
}
