package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/warren-mesh/warren/pkg/identity"
)

// inspectViews maps each inspect subcommand to the admin API path it reads
// and how it prints.
var inspectViews = map[string]struct {
	path  string
	short string
	print func(w io.Writer, body []byte) error
}{
	"workloads": {"/workloads", "local workloads: identity, addresses, netns, capture, open connections", printWorkloads},
	"services":  {"/config_dump", "services and their VIPs", printSection("services")},
	"policies":  {"/config_dump", "authorization policies in force", printSection("policies")},
	"certs":     {"/certs", "certificates held: identity, the CA provider, state, validity, and why one is missing", printCerts},
	"bpf":       {"/bpf", "capture counters and pin directory", printRaw},
	"config":    {"/config_dump", "the whole configuration in force and its provider's status", printRaw},
}

func newInspectCmd() *cobra.Command {
	var admin string
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Show what a running agent holds, through its admin API",
	}
	cmd.PersistentFlags().StringVar(&admin, "admin-addr", "127.0.0.1:15000", "the agent's admin API address")
	names := make([]string, 0, len(inspectViews))
	for name := range inspectViews {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		v := inspectViews[name]
		cmd.AddCommand(&cobra.Command{
			Use:   name,
			Short: v.short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				if err := applyEnv(cmd.Flags()); err != nil {
					return err
				}
				body, err := adminGet(admin, v.path)
				if err != nil {
					return err
				}
				return v.print(cmd.OutOrStdout(), body)
			},
		})
	}
	return cmd
}

func adminGet(addr, path string) ([]byte, error) {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		return nil, fmt.Errorf("read %s from the agent's admin API: %w (is the agent running on this node? --admin-addr)", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("admin API %s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

func printRaw(w io.Writer, body []byte) error {
	_, err := w.Write(body)
	return err
}

func printSection(key string) func(io.Writer, []byte) error {
	return func(w io.Writer, body []byte) error {
		var dump map[string]json.RawMessage
		if err := json.Unmarshal(body, &dump); err != nil {
			return fmt.Errorf("decode config dump: %w", err)
		}
		var v any
		if err := json.Unmarshal(dump[key], &v); err != nil {
			return fmt.Errorf("decode %s: %w", key, err)
		}
		b, _ := json.MarshalIndent(v, "", "  ")
		_, err := fmt.Fprintf(w, "%s\n", b)
		return err
	}
}

func printWorkloads(w io.Writer, body []byte) error {
	var ws []struct {
		Name, Namespace, Identity, Netns, Error string
		IPs                                     []string
		NetnsCookie                             uint64
		Serving                                 bool
		OpenInboundConnections                  int
	}
	if err := json.Unmarshal(body, &ws); err != nil {
		return fmt.Errorf("decode workloads: %w", err)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tNAME\tIDENTITY\tIPS\tCAPTURE\tOPEN\tNETNS")
	for _, x := range ws {
		capture := fmt.Sprintf("enrolled (netns cookie %d)", x.NetnsCookie)
		if !x.Serving {
			capture = "NOT SERVING: " + x.Error
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", x.Namespace, x.Name, x.Identity, strings.Join(x.IPs, ","), capture, x.OpenInboundConnections, x.Netns)
	}
	return tw.Flush()
}

// printCerts prints the /certs view as a table: each identity a pod of this
// node has, the provider asked (--ca-provider), the state, the certificate
// held, and the last fetch's error, which says why a certificate is missing
// or not renewed.
func printCerts(w io.Writer, body []byte) error {
	var cs []identity.CertInfo
	if err := json.Unmarshal(body, &cs); err != nil {
		return fmt.Errorf("decode certificates: %w", err)
	}
	if len(cs) == 0 {
		_, err := fmt.Fprintln(w, "no certificates: no enrolled pod on this node (inspect workloads)")
		return err
	}
	ts := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.UTC().Format(time.RFC3339)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tPROVIDER\tSTATE\tPODS\tSERIAL\tNOT AFTER\tNEXT REFRESH\tLAST ERROR")
	for _, c := range cs {
		serial, lastErr := c.Serial, c.LastError
		if serial == "" {
			serial = "-"
		}
		switch {
		case lastErr != "":
		case c.State == identity.StatePending:
			lastErr = "first fetch in progress"
		default:
			lastErr = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", c.Identity, c.Provider, c.State, c.Pods, serial, ts(c.NotAfter), ts(c.NextRefresh), lastErr)
	}
	return tw.Flush()
}
