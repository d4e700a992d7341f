/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The agent's transparent connects (source address preservation): the agent
 * connects to an app inside its pod from the client's address, on a socket
 * marked wr_cfg_tmark. Its SYN reaches the pod's netns like one from outside,
 * so sk_lookup would steer it to the inbound listener; sockops records the
 * connect in wr_tpass from connect to ESTABLISHED (or close) and sk_lookup
 * lets a recorded SYN through to the app. */
#ifndef WR_TPASS_H
#define WR_TPASS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "types.h"
#include "maps.h"
#include "addr.h"
#include "config.h"
#include "net.h"

/* wr_tp_marked reports whether the sockops socket is a transparent one. */
static __always_inline int wr_tp_marked(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	return sk && WR_GET(sk, mark) == wr_cfg_tmark;
}

/* wr_tp_key_ops builds the wr_tpass key of the connecting socket (local =
 * the client's address, remote = the app); 0 when its netns is not enrolled. */
static __always_inline int wr_tp_key_ops(struct bpf_sock_ops *ctx, struct wr_tp_key *k)
{
	struct wr_pod *pod;
	__u64 netns;
	__u32 w[4];

	netns = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&wr_pods, &netns);
	if (!pod)
		return 0;
	k->slot = pod->slot;
	k->sport = (__u16)WR_GET(ctx, local_port);
	k->dport = (__u16)bpf_ntohl(WR_GET(ctx, remote_port));
	if (WR_GET(ctx, family) == AF_INET) {
		wr_addr_from4(&k->src, WR_GET(ctx, local_ip4));
		wr_addr_from4(&k->dst, WR_GET(ctx, remote_ip4));
		return 1;
	}
	w[0] = WR_GET(ctx, local_ip6[0]);
	w[1] = WR_GET(ctx, local_ip6[1]);
	w[2] = WR_GET(ctx, local_ip6[2]);
	w[3] = WR_GET(ctx, local_ip6[3]);
	wr_addr_from6(&k->src, w);
	w[0] = WR_GET(ctx, remote_ip6[0]);
	w[1] = WR_GET(ctx, remote_ip6[1]);
	w[2] = WR_GET(ctx, remote_ip6[2]);
	w[3] = WR_GET(ctx, remote_ip6[3]);
	wr_addr_from6(&k->dst, w);
	return 1;
}

/* wr_tp_connect records a transparent connect before its SYN leaves and asks
 * for state callbacks, so that the record goes at ESTABLISHED or close. */
static __always_inline void wr_tp_connect(struct bpf_sock_ops *ctx)
{
	struct wr_tp_key k;
	__u8 one = 1;

	if (!wr_tp_marked(ctx) || !wr_tp_key_ops(ctx, &k))
		return;
	if (bpf_map_update_elem(&wr_tpass, &k, &one, BPF_ANY)) {
		WR_COUNT(err_tp);
		return;
	}
	WR_COUNT(tp_add);
	bpf_sock_ops_cb_flags_set(ctx, WR_GET(ctx, bpf_sock_ops_cb_flags) |
				       BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* wr_tp_done removes the record of a transparent connect that is established
 * (its SYN went through) or closed; established, it also stops the state
 * callbacks. Returns 1 when ctx was a transparent socket. */
static __always_inline int wr_tp_done(struct bpf_sock_ops *ctx, int established)
{
	struct wr_tp_key k;

	if (!wr_tp_marked(ctx))
		return 0;
	if (wr_tp_key_ops(ctx, &k))
		bpf_map_delete_elem(&wr_tpass, &k);
	if (established)
		bpf_sock_ops_cb_flags_set(ctx, WR_GET(ctx, bpf_sock_ops_cb_flags) &
					       ~BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* wr_tp_passed reports whether an inbound SYN (remote = src, local = dst,
 * ports host order) in the namespace of slot is a recorded transparent connect. */
static __always_inline int wr_tp_passed(__u32 slot, const struct wr_addr *src, __u16 sport,
					const struct wr_addr *dst, __u16 dport)
{
	struct wr_tp_key k;

	k.slot = slot;
	k.sport = sport;
	k.dport = dport;
	k.src = *src;
	k.dst = *dst;
	return bpf_map_lookup_elem(&wr_tpass, &k) != NULL;
}

#endif
