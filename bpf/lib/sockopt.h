/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* SO_ORIGINAL_DST for any proxy (cgroup/getsockopt): getsockopt(SOL_IP,
 * SO_ORIGINAL_DST) or getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) on a
 * connection accepted on the outbound listener answers from wr_orig, as
 * iptables REDIRECT + conntrack would. */
#ifndef WR_SOCKOPT_H
#define WR_SOCKOPT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "types.h"
#include "maps.h"
#include "addr.h"
#include "net.h"

#define WR_SOL_IP 0
#define WR_SOL_IPV6 41
#define WR_SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */

/* struct sockaddr_in and sockaddr_in6, without libc headers. */
struct wr_sockaddr_in {
	__u16 family;
	__be16 port;
	__u32 addr;
	__u8 zero[8];
};

struct wr_sockaddr_in6 {
	__u16 family;
	__be16 port;
	__u32 flowinfo;
	__u8 addr[16];
	__u32 scope_id;
};

static __always_inline int wr_getsockopt_run(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk;
	struct wr_tuple k;
	struct wr_dst *d;
	__s32 level, optlen;
	__u32 w[4];
	void *optval, *end;
	const __u32 *a;

	if (WR_GET(ctx, optname) != WR_SO_ORIGINAL_DST)
		return 1;
	level = WR_GET(ctx, level);
	if (level != WR_SOL_IP && level != WR_SOL_IPV6)
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	/* The agent's accepted socket: local end = listener, remote = client. */
	if (WR_GET(sk, family) == AF_INET) {
		wr_addr_from4(&k.src, WR_GET(sk, dst_ip4));
		wr_addr_from4(&k.dst, WR_GET(sk, src_ip4));
	} else {
		w[0] = WR_GET(sk, dst_ip6[0]);
		w[1] = WR_GET(sk, dst_ip6[1]);
		w[2] = WR_GET(sk, dst_ip6[2]);
		w[3] = WR_GET(sk, dst_ip6[3]);
		wr_addr_from6(&k.src, w);
		w[0] = WR_GET(sk, src_ip6[0]);
		w[1] = WR_GET(sk, src_ip6[1]);
		w[2] = WR_GET(sk, src_ip6[2]);
		w[3] = WR_GET(sk, src_ip6[3]);
		wr_addr_from6(&k.dst, w);
	}
	k.netns = bpf_get_netns_cookie(ctx);
	k.sport = bpf_ntohs(WR_GET_PORT(sk));
	k.dport = (__u16)WR_GET(sk, src_port);
	k.pad = 0;
	d = bpf_map_lookup_elem(&wr_orig, &k);
	if (!d)
		return 1; /* not captured: keep the kernel's answer */

	optval = ctx->optval;
	end = ctx->optval_end;
	optlen = WR_GET(ctx, optlen);
	a = (const __u32 *)d->addr.b;
	if (level == WR_SOL_IP) {
		struct wr_sockaddr_in *sin = optval;

		if (!wr_is_v4mapped(a[0], a[1], a[2]))
			return 1;
		if ((void *)(sin + 1) > end || optlen < (__s32)sizeof(*sin))
			return 1;
		sin->family = AF_INET;
		sin->port = bpf_htons(d->port);
		sin->addr = a[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		WR_SET(ctx, optlen, sizeof(*sin));
	} else {
		struct wr_sockaddr_in6 *sin6 = optval;

		if ((void *)(sin6 + 1) > end || optlen < (__s32)sizeof(*sin6))
			return 1;
		sin6->family = AF_INET6;
		sin6->port = bpf_htons(d->port);
		sin6->flowinfo = 0;
		__builtin_memcpy(sin6->addr, d->addr.b, 16);
		sin6->scope_id = 0;
		WR_SET(ctx, optlen, sizeof(*sin6));
	}
	WR_SET(ctx, retval, 0);
	return 1;
}

#endif
