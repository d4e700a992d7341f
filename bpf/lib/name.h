/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* getpeername and getsockname of a captured connection (cgroup/getpeername4|6,
 * cgroup/getsockname4|6): the app's socket is connected to the outbound
 * listener on loopback; it is answered as if it were connected to the
 * original destination from the pod's address, as iptables REDIRECT makes
 * it look through conntrack. The port of getsockname stays the socket's own. */
#ifndef WR_NAME_H
#define WR_NAME_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "types.h"
#include "maps.h"
#include "addr.h"
#include "config.h"
#include "net.h"

/* wr_name_orig returns the original destination of ctx's socket when it is
 * a captured connection (an app's socket in an enrolled netns, connected to
 * the outbound listener on loopback), else NULL. *v4 is set when the socket
 * is IPv4 or IPv4-mapped. */
static __always_inline struct wr_dst *wr_name_orig(struct bpf_sock_addr *ctx, int *v4)
{
	struct bpf_sock *sk;
	struct wr_tuple k;
	__u32 w[4];

	if (WR_GET(ctx, type) != SOCK_STREAM || WR_GET(ctx, protocol) != IPPROTO_TCP)
		return NULL;
	sk = ctx->sk;
	if (!sk)
		return NULL;
	if (WR_GET(sk, family) == AF_INET) {
		wr_addr_from4(&k.dst, WR_GET(sk, dst_ip4));
		wr_addr_from4(&k.src, WR_GET(sk, src_ip4));
	} else {
		w[0] = WR_GET(sk, dst_ip6[0]);
		w[1] = WR_GET(sk, dst_ip6[1]);
		w[2] = WR_GET(sk, dst_ip6[2]);
		w[3] = WR_GET(sk, dst_ip6[3]);
		wr_addr_from6(&k.dst, w);
		w[0] = WR_GET(sk, src_ip6[0]);
		w[1] = WR_GET(sk, src_ip6[1]);
		w[2] = WR_GET(sk, src_ip6[2]);
		w[3] = WR_GET(sk, src_ip6[3]);
		wr_addr_from6(&k.src, w);
	}
	/* Captured connects go to loopback: anything else costs no lookup. */
	if (!wr_local_addr(&k.dst))
		return NULL;
	w[0] = ((const __u32 *)k.dst.b)[0];
	w[1] = ((const __u32 *)k.dst.b)[1];
	w[2] = ((const __u32 *)k.dst.b)[2];
	*v4 = wr_is_v4mapped(w[0], w[1], w[2]);
	k.netns = bpf_get_netns_cookie(ctx);
	k.sport = (__u16)WR_GET(sk, src_port);
	k.dport = bpf_ntohs(WR_GET_PORT(sk));
	k.pad = 0;
	return bpf_map_lookup_elem(&wr_orig, &k);
}

/* wr_name_set stores a (normal form) address and port (host order, 0 =
 * keep) as ctx's answer, in the socket's family: IPv4 as is on an AF_INET
 * socket, IPv4-mapped on an AF_INET6 one. */
static __always_inline void wr_name_set(struct bpf_sock_addr *ctx, int family,
					const struct wr_addr *a, __u16 port)
{
	const __u32 *w = (const __u32 *)a->b;

	if (family == AF_INET) {
		WR_SET(ctx, user_ip4, w[3]);
	} else {
		WR_SET(ctx, user_ip6[0], w[0]);
		WR_SET(ctx, user_ip6[1], w[1]);
		WR_SET(ctx, user_ip6[2], w[2]);
		WR_SET(ctx, user_ip6[3], w[3]);
	}
	if (port)
		WR_SET(ctx, user_port, (__u32)bpf_htons(port));
}

/* wr_getpeername_run answers getpeername of a captured connection with its
 * original destination. family is the hook's (AF_INET: getpeername4). */
static __always_inline int wr_getpeername_run(struct bpf_sock_addr *ctx, int family)
{
	struct wr_dst *d;
	const __u32 *a;
	int v4 = 0;

	d = wr_name_orig(ctx, &v4);
	if (!d)
		return 1;
	a = (const __u32 *)d->addr.b;
	/* Recorded in the family the app dialed; a mismatch cannot be said. */
	if (v4 != wr_is_v4mapped(a[0], a[1], a[2]))
		return 1;
	wr_name_set(ctx, family, &d->addr, d->port);
	WR_COUNT(peer_orig);
	return 1;
}

/* wr_getsockname_run answers getsockname of a captured connection with the
 * pod's address of the connection's family (the socket's own port). */
static __always_inline int wr_getsockname_run(struct bpf_sock_addr *ctx, int family)
{
	struct wr_podip *ip;
	struct wr_addr *a;
	__u64 netns;
	int v4 = 0;

	if (!wr_name_orig(ctx, &v4))
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	ip = bpf_map_lookup_elem(&wr_pod_ip, &netns);
	if (!ip) {
		WR_COUNT(sock_no_ip);
		return 1;
	}
	a = v4 ? &ip->v4 : &ip->v6;
	if (wr_local_addr(a)) { /* all-zero: the pod has none of this family */
		WR_COUNT(sock_no_ip);
		return 1;
	}
	wr_name_set(ctx, family, a, 0);
	WR_COUNT(sock_pod);
	return 1;
}

#endif
