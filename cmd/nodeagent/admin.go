package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
)

// adminHandler serves the admin API (localhost only):
//
//	/config_dump   the configuration in force and its provider's status
//	/workloads     local workloads: listeners, capture, open connections
//	/certs         certificates held: identity, serial, validity, provider
//	/bpf           capture counters and pin directory
//	/logging       GET the level; POST ?level=debug|info|warn|error to change it
//	/debug/pprof/  Go profiles
func (a *agent) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, _ *http.Request) {
		snap := a.store.Current()
		writeJSON(w, map[string]any{
			"node":                snap.Node(),
			"provider":            a.provider.Status(),
			"generation":          a.store.Generation(),
			"workloads":           snap.Workloads(),
			"services":            snap.Services(),
			"policies":            snap.Policies(),
			"peerAuthentications": snap.PeerAuthentications(),
		})
	})
	mux.HandleFunc("GET /workloads", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, a.proxy.Workloads())
	})
	mux.HandleFunc("GET /certs", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, a.certs.Certificates())
	})
	mux.HandleFunc("GET /bpf", func(w http.ResponseWriter, _ *http.Request) {
		st, err := a.loader.Stats()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, map[string]any{"pinDir": a.loader.PinDir(), "stats": st, "errors": st.Errors()})
	})
	mux.HandleFunc("/logging", func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			var lv slog.Level
			if err := lv.UnmarshalText([]byte(r.URL.Query().Get("level"))); err != nil {
				http.Error(w, "level must be debug, info, warn or error", http.StatusBadRequest)
				return
			}
			a.level.Set(lv)
			a.log.Info("log level changed", "level", lv.String())
		}
		fmt.Fprintf(w, "level=%s\n", a.level.Level())
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// writeJSON encodes v whole before answering, so a failure is a clean 500.
func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		http.Error(w, "encode: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(b, '\n'))
}
