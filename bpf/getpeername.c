// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* getpeername of a captured connection: the original destination. Attached at the cgroup2 root. */
#include "lib/name.h"

SEC("cgroup/getpeername4")
int wr_getpeername4(struct bpf_sock_addr *ctx)
{
	return wr_getpeername_run(ctx, AF_INET);
}

SEC("cgroup/getpeername6")
int wr_getpeername6(struct bpf_sock_addr *ctx)
{
	return wr_getpeername_run(ctx, AF_INET6);
}

char _license[] SEC("license") = "Dual BSD/GPL";
