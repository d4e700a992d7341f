package config

// MarshalText renders the key as "namespace/hostname", so maps keyed by it
// encode to JSON (the admin API's config dump).
func (n NamespacedHostname) MarshalText() ([]byte, error) { return []byte(n.String()), nil }

// UnmarshalText parses "namespace/hostname".
func (n *NamespacedHostname) UnmarshalText(b []byte) error {
	v, err := ParseNamespacedHostname(string(b))
	if err != nil {
		return err
	}
	*n = v
	return nil
}
