// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Inbound plaintext steering, attached to each enrolled network namespace. */
#include "lib/inbound.h"

SEC("sk_lookup")
int wr_sk_lookup(struct bpf_sk_lookup *ctx)
{
	return wr_sk_lookup_run(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
