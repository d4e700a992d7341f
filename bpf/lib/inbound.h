/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Inbound plaintext capture (sk_lookup, one program instance per enrolled
 * network namespace: sk_lookup has no netns cookie helper, so the loader bakes
 * the namespace's slot into each instance). */
#ifndef WR_INBOUND_H
#define WR_INBOUND_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "types.h"
#include "maps.h"
#include "addr.h"
#include "net.h"
#include "tpass.h"

/* Slot of the namespace this instance is attached to (wr_inbound, wr_exempt). */
volatile const __u32 wr_cfg_slot = 0;
/* Destination port never steered: the HBONE listener's. */
volatile const __u32 wr_cfg_hbone_port = 15008;

static __always_inline int wr_sk_lookup_run(struct bpf_sk_lookup *ctx)
{
	struct wr_exempt_key ek;
	struct wr_addr local;
	struct bpf_sock *sk;
	__u32 w[4], slot;
	long err;

	if (WR_GET(ctx, protocol) != IPPROTO_TCP)
		return SK_PASS;
	if (WR_GET(ctx, local_port) == wr_cfg_hbone_port) {
		WR_COUNT(in_pass_port);
		return SK_PASS;
	}
	if (WR_GET(ctx, family) == AF_INET) {
		wr_addr_from4(&ek.addr, WR_GET(ctx, remote_ip4));
		wr_addr_from4(&local, WR_GET(ctx, local_ip4));
	} else {
		w[0] = WR_GET(ctx, remote_ip6[0]);
		w[1] = WR_GET(ctx, remote_ip6[1]);
		w[2] = WR_GET(ctx, remote_ip6[2]);
		w[3] = WR_GET(ctx, remote_ip6[3]);
		wr_addr_from6(&ek.addr, w);
		w[0] = WR_GET(ctx, local_ip6[0]);
		w[1] = WR_GET(ctx, local_ip6[1]);
		w[2] = WR_GET(ctx, local_ip6[2]);
		w[3] = WR_GET(ctx, local_ip6[3]);
		wr_addr_from6(&local, w);
	}
	/* From inside the pod: loopback, or the pod's own address (the kernel
	 * picks the destination as source for a local destination). The agent
	 * reaches the app this way, so it is never recaptured. */
	if (wr_local_addr(&ek.addr) || wr_addr_eq(&ek.addr, &local)) {
		WR_COUNT(in_pass_local);
		return SK_PASS;
	}
	ek.slot = wr_cfg_slot;
	if (bpf_map_lookup_elem(&wr_exempt, &ek)) {
		WR_COUNT(in_pass_exempt);
		return SK_PASS;
	}
	/* The agent's own connect to the app from a client's address. */
	if (wr_tp_passed(wr_cfg_slot, &ek.addr, bpf_ntohs(WR_GET_BE16(ctx, remote_port)),
			 &local, (__u16)WR_GET(ctx, local_port))) {
		WR_COUNT(in_pass_tp);
		return SK_PASS;
	}
	slot = wr_cfg_slot;
	sk = bpf_map_lookup_elem(&wr_inbound, &slot);
	if (!sk) {
		WR_COUNT(err_no_listener);
		return SK_PASS;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		WR_COUNT(err_assign);
		return SK_PASS;
	}
	WR_COUNT(in_captured);
	return SK_PASS;
}

#endif
