// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* getsockname of a captured connection: the pod's address. Attached at the cgroup2 root. */
#include "lib/name.h"

SEC("cgroup/getsockname4")
int wr_getsockname4(struct bpf_sock_addr *ctx)
{
	return wr_getsockname_run(ctx, AF_INET);
}

SEC("cgroup/getsockname6")
int wr_getsockname6(struct bpf_sock_addr *ctx)
{
	return wr_getsockname_run(ctx, AF_INET6);
}

char _license[] SEC("license") = "Dual BSD/GPL";
