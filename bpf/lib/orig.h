/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Original destinations (sockops): moved from wr_pending (socket cookie) to
 * the tuple-keyed wr_orig when the client's connect is ESTABLISHED, removed
 * when the agent's accepted socket closes. */
#ifndef WR_ORIG_H
#define WR_ORIG_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "types.h"
#include "maps.h"
#include "addr.h"
#include "net.h"
#include "tpass.h"

/* wr_ops_addrs reads the socket's local and remote addresses in normal form. */
static __always_inline void wr_ops_addrs(struct bpf_sock_ops *ctx,
					 struct wr_addr *local, struct wr_addr *remote)
{
	__u32 w[4];

	if (WR_GET(ctx, family) == AF_INET) {
		wr_addr_from4(local, WR_GET(ctx, local_ip4));
		wr_addr_from4(remote, WR_GET(ctx, remote_ip4));
		return;
	}
	w[0] = WR_GET(ctx, local_ip6[0]);
	w[1] = WR_GET(ctx, local_ip6[1]);
	w[2] = WR_GET(ctx, local_ip6[2]);
	w[3] = WR_GET(ctx, local_ip6[3]);
	wr_addr_from6(local, w);
	w[0] = WR_GET(ctx, remote_ip6[0]);
	w[1] = WR_GET(ctx, remote_ip6[1]);
	w[2] = WR_GET(ctx, remote_ip6[2]);
	w[3] = WR_GET(ctx, remote_ip6[3]);
	wr_addr_from6(remote, w);
}

/* wr_ops_key builds the wr_orig key. client is 1 on the app's (connecting)
 * socket and 0 on the agent's accepted socket, whose local end is the
 * listener: both build the same key for one connection. */
static __always_inline void wr_ops_key(struct bpf_sock_ops *ctx, struct wr_tuple *k, int client)
{
	struct wr_addr local, remote;
	__u16 lport = (__u16)WR_GET(ctx, local_port);               /* host order */
	__u16 rport = (__u16)bpf_ntohl(WR_GET(ctx, remote_port));    /* be16 in the high half */

	wr_ops_addrs(ctx, &local, &remote);
	k->netns = bpf_get_netns_cookie(ctx);
	k->pad = 0;
	if (client) {
		k->src = local;
		k->dst = remote;
		k->sport = lport;
		k->dport = rport;
	} else {
		k->src = remote;
		k->dst = local;
		k->sport = rport;
		k->dport = lport;
	}
}

static __always_inline int wr_sockops_run(struct bpf_sock_ops *ctx)
{
	struct wr_tuple k;
	struct wr_pend *d;
	__u64 netns, cookie;

	switch (WR_GET(ctx, op)) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		wr_tp_connect(ctx);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (wr_tp_done(ctx, 1))
			break;
		cookie = bpf_get_socket_cookie(ctx);
		d = bpf_map_lookup_elem(&wr_pending, &cookie);
		if (!d)
			break;
		wr_ops_key(ctx, &k, 1);
		if (bpf_map_update_elem(&wr_orig, &k, &d->dst, BPF_ANY))
			WR_COUNT(err_orig);
		else
			WR_COUNT(orig_add);
		bpf_map_delete_elem(&wr_pending, &cookie);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		netns = bpf_get_netns_cookie(ctx);
		if (!bpf_map_lookup_elem(&wr_pods, &netns))
			break;
		wr_ops_key(ctx, &k, 0);
		if (bpf_map_lookup_elem(&wr_orig, &k))
			bpf_sock_ops_cb_flags_set(ctx, WR_GET(ctx, bpf_sock_ops_cb_flags) |
							       BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (WR_GET(ctx, args[1]) != BPF_TCP_CLOSE)
			break;
		if (wr_tp_done(ctx, 0))
			break;
		wr_ops_key(ctx, &k, 0);
		if (!bpf_map_delete_elem(&wr_orig, &k))
			WR_COUNT(orig_del);
		break;
	}
	return 1;
}

#endif
