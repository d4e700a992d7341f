/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address helpers: the 16-byte normal form and the loopback test. */
#ifndef WR_ADDR_H
#define WR_ADDR_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include "types.h"

/* WR_GET and WR_SET access a 32-bit context field with one full-width
 * load or store straight off the context register: the compiler can neither
 * narrow it nor merge two branches' accesses into arithmetic on the context
 * pointer, which the verifier refuses ("dereference of modified ctx ptr"). */
#define WR_GET(ptr, field) ({						\
	__u32 __v;							\
	_Static_assert(sizeof((ptr)->field) == 4, "32-bit field");	\
	asm volatile("%0 = *(u32 *)(%1 + %2)"				\
		     : "=r"(__v)					\
		     : "r"(ptr), "i"(__builtin_offsetof(typeof(*(ptr)), field))); \
	__v;								\
})
/* WR_GET_PORT reads bpf_sock.dst_port with a 4-byte load (the kernel keeps
 * accepting the width the field had before 5.18): network order, low half. */
#define WR_GET_PORT(sk) ({						\
	__u32 __v;							\
	asm volatile("%0 = *(u32 *)(%1 + %2)"				\
		     : "=r"(__v)					\
		     : "r"(sk), "i"(__builtin_offsetof(struct bpf_sock, dst_port))); \
	(__u16)__v;							\
})
/* WR_GET_BE16 does the same for bpf_sk_lookup.remote_port, a __be16 in
 * kernels since 5.19 and a __u32 before: network order, low half. */
#define WR_GET_BE16(ptr, field) ({					\
	__u32 __v;							\
	asm volatile("%0 = *(u32 *)(%1 + %2)"				\
		     : "=r"(__v)					\
		     : "r"(ptr), "i"(__builtin_offsetof(typeof(*(ptr)), field))); \
	(__u16)__v;							\
})
#define WR_SET(ptr, field, val) ({					\
	__u32 __v = (val);						\
	_Static_assert(sizeof((ptr)->field) == 4, "32-bit field");	\
	asm volatile("*(u32 *)(%0 + %1) = %2"				\
		     :							\
		     : "r"(ptr), "i"(__builtin_offsetof(typeof(*(ptr)), field)), "r"(__v) \
		     : "memory");					\
})

/* wr_addr_from4 stores an IPv4 address (network order) as ::ffff:a.b.c.d. */
static __always_inline void wr_addr_from4(struct wr_addr *a, __u32 ip4)
{
	__u32 *w = (__u32 *)a->b;

	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = ip4;
}

/* wr_addr_from6 stores an IPv6 address (four network-order words) as is:
 * an IPv4-mapped address is therefore already in normal form. */
static __always_inline void wr_addr_from6(struct wr_addr *a, const __u32 w6[4])
{
	__u32 *w = (__u32 *)a->b;

	w[0] = w6[0];
	w[1] = w6[1];
	w[2] = w6[2];
	w[3] = w6[3];
}

/* wr_is_v4mapped reports whether w6 is ::ffff:a.b.c.d. */
static __always_inline int wr_is_v4mapped(__u32 w0, __u32 w1, __u32 w2)
{
	return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

/* wr_local4 reports whether an IPv4 address (network order) never leaves the
 * host's namespace: 127.0.0.0/8 or 0.0.0.0. */
static __always_inline int wr_local4(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127 || ip4 == 0;
}

/* wr_local_addr is wr_local4 for the 16-byte form, plus ::1 and ::. */
static __always_inline int wr_local_addr(const struct wr_addr *a)
{
	const __u32 *w = (const __u32 *)a->b;

	if (wr_is_v4mapped(w[0], w[1], w[2]))
		return wr_local4(w[3]);
	return w[0] == 0 && w[1] == 0 && w[2] == 0 &&
	       (w[3] == 0 || w[3] == bpf_htonl(1));
}

static __always_inline int wr_addr_eq(const struct wr_addr *a, const struct wr_addr *b)
{
	const __u32 *x = (const __u32 *)a->b, *y = (const __u32 *)b->b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

#endif
