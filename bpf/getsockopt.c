// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* SO_ORIGINAL_DST for proxies that ask the kernel, attached at the cgroup2 root. */
#include "lib/sockopt.h"

SEC("cgroup/getsockopt")
int wr_getsockopt(struct bpf_sockopt *ctx)
{
	return wr_getsockopt_run(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
