// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Original-destination bookkeeping, attached at the cgroup2 root. */
#include "lib/orig.h"

SEC("sockops")
int wr_sockops(struct bpf_sock_ops *ctx)
{
	return wr_sockops_run(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
