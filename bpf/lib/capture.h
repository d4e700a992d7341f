/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Outbound capture (cgroup/connect4, cgroup/connect6). */
#ifndef WR_CAPTURE_H
#define WR_CAPTURE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "types.h"
#include "maps.h"
#include "addr.h"
#include "config.h"
#include "net.h"

/* wr_capture decides whether the connect of ctx to dst:port (normal form,
 * port host order) is captured; if so it records the original destination in
 * wr_pending under the socket cookie and returns the pod's outbound port,
 * else 0. (An LRU keyed by cookie measured 2.4x cheaper than socket-local
 * storage, whose create and delete allocate and free per socket.) */
static __always_inline __u16 wr_capture(struct bpf_sock_addr *ctx,
					const struct wr_addr *dst, __u16 port)
{
	struct bpf_sock *sk;
	struct wr_pod *pod;
	struct wr_pend rec;
	struct wr_cidr ck;
	__u64 netns, cookie;
	__u32 p;
	__u8 *ex;

	if (WR_GET(ctx, type) != SOCK_STREAM || WR_GET(ctx, protocol) != IPPROTO_TCP)
		return 0;
	netns = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&wr_pods, &netns);
	if (!pod)
		return 0;
	sk = ctx->sk;
	if (!sk)
		return 0;
	p = WR_GET(sk, mark);
	if (p == wr_cfg_mark || p == wr_cfg_tmark) {
		WR_COUNT(pass_mark);
		return 0;
	}
	if (wr_local_addr(dst)) {
		WR_COUNT(pass_local);
		return 0;
	}
	p = port;
	ex = bpf_map_lookup_elem(&wr_exc_port, &p);
	if (ex && *ex) {
		WR_COUNT(pass_port);
		return 0;
	}
	if (wr_cfg_cidrs) {
		ck.prefixlen = 128;
		ck.addr = *dst;
		if (bpf_map_lookup_elem(&wr_exc_cidr, &ck)) {
			WR_COUNT(pass_cidr);
			return 0;
		}
	}
	rec.dst.addr = *dst;
	rec.dst.port = port;
	rec.dst.pad1 = 0;
	rec.dst.pad2 = 0;
	rec.netns = netns;
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&wr_pending, &cookie, &rec, BPF_ANY)) {
		WR_COUNT(err_pending);
		return 0;
	}
	WR_COUNT(captured);
	return pod->out_port;
}

static __always_inline int wr_do_connect4(struct bpf_sock_addr *ctx)
{
	struct wr_addr dst;
	__u16 out;

	wr_addr_from4(&dst, WR_GET(ctx, user_ip4));
	out = wr_capture(ctx, &dst, bpf_ntohs((__u16)WR_GET(ctx, user_port)));
	if (out) {
		WR_SET(ctx, user_ip4, bpf_htonl(0x7f000001));
		WR_SET(ctx, user_port, (__u32)bpf_htons(out));
	}
	return 1;
}

static __always_inline int wr_do_connect6(struct bpf_sock_addr *ctx)
{
	struct wr_addr dst;
	__u32 w[4];
	__u16 out;

	w[0] = WR_GET(ctx, user_ip6[0]);
	w[1] = WR_GET(ctx, user_ip6[1]);
	w[2] = WR_GET(ctx, user_ip6[2]);
	w[3] = WR_GET(ctx, user_ip6[3]);
	wr_addr_from6(&dst, w);
	out = wr_capture(ctx, &dst, bpf_ntohs((__u16)WR_GET(ctx, user_port)));
	if (!out)
		return 1;
	if (wr_is_v4mapped(w[0], w[1], w[2])) {
		/* Stay on IPv4: ::ffff:127.0.0.1 reaches the IPv4 listener. */
		WR_SET(ctx, user_ip6[0], 0);
		WR_SET(ctx, user_ip6[1], 0);
		WR_SET(ctx, user_ip6[2], bpf_htonl(0x0000ffff));
		WR_SET(ctx, user_ip6[3], bpf_htonl(0x7f000001));
	} else {
		WR_SET(ctx, user_ip6[0], 0);
		WR_SET(ctx, user_ip6[1], 0);
		WR_SET(ctx, user_ip6[2], 0);
		WR_SET(ctx, user_ip6[3], bpf_htonl(1));
	}
	WR_SET(ctx, user_port, (__u32)bpf_htons(out));
	return 1;
}

#endif
