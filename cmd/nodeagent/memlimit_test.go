package main

import "testing"

func TestSoftMemoryLimit(t *testing.T) {
	for _, tc := range []struct {
		name      string
		limit     int64
		gomemlim  bool
		want      int64
		wantApply bool
	}{
		{"no container limit", 0, false, 0, false},
		{"negative", -1, false, 0, false},
		{"chart default 512Mi", 512 << 20, false, 483183820, true},
		{"160Mi", 160 << 20, false, 150994944, true},
		{"GOMEMLIMIT set wins", 512 << 20, true, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, apply := softMemoryLimit(tc.limit, tc.gomemlim)
			if got != tc.want || apply != tc.wantApply {
				t.Errorf("softMemoryLimit(%d, %v) = %d, %v; want %d, %v", tc.limit, tc.gomemlim, got, apply, tc.want, tc.wantApply)
			}
		})
	}
}
