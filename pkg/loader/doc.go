// Package loader loads, attaches, pins and inspects warren's eBPF capture.
package loader
