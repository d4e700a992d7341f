package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"
)

// envPrefix names the environment variables that set flags: --trust-domain
// is also WARREN_TRUST_DOMAIN. A flag given on the command line wins.
const envPrefix = "WARREN_"

// envName returns the environment variable of a flag.
func envName(flag string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// applyEnv sets every flag not given on the command line from its
// environment variable, and fails on a value the flag rejects.
func applyEnv(fs *pflag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if serr := fs.Set(f.Name, v); serr != nil {
				err = fmt.Errorf("%s=%q: %w", envName(f.Name), v, serr)
			}
		}
	})
	return err
}

// documentEnv appends each flag's environment variable to its usage.
func documentEnv(fs *pflag.FlagSet) {
	fs.VisitAll(func(f *pflag.Flag) {
		f.Usage += " [" + envName(f.Name) + "]"
	})
}
