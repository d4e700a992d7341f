// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Outbound capture hooks, attached at the cgroup2 root. */
#include "lib/capture.h"

SEC("cgroup/connect4")
int wr_connect4(struct bpf_sock_addr *ctx)
{
	return wr_do_connect4(ctx);
}

SEC("cgroup/connect6")
int wr_connect6(struct bpf_sock_addr *ctx)
{
	return wr_do_connect6(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
