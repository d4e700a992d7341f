/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared by warren's BPF programs and, through bpf2go -type, by pkg/loader. */
#ifndef WR_TYPES_H
#define WR_TYPES_H

#include <linux/types.h>

/* Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d),
 * so one key layout serves both families and an IPv4 connection made from an
 * IPv6 socket (v4-mapped) keys the same as one made from an IPv4 socket. */
struct wr_addr {
	__u8 b[16];
};

/* wr_pod is the enrollment of one network namespace (key: netns cookie). */
struct wr_pod {
	__u16 out_port; /* outbound listener port, host order (15001) */
	__u16 flags;    /* reserved, 0 */
	__u32 slot;     /* index into wr_inbound / wr_exempt, per-netns sk_lookup */
};

/* wr_tuple keys wr_orig. It is the connection as the client socket sees it
 * (src = the app's socket, dst = the outbound listener), plus the network
 * namespace cookie: loopback tuples repeat in every pod. Ports host order. */
struct wr_tuple {
	__u64 netns;
	struct wr_addr src;
	struct wr_addr dst;
	__u16 sport;
	__u16 dport;
	__u32 pad;
};

/* wr_dst is an original destination (port host order). */
struct wr_dst {
	struct wr_addr addr;
	__u16 port;
	__u16 pad1;
	__u32 pad2;
};

/* wr_pend is a wr_pending value: the original destination and the netns,
 * so that Unenroll can drop the in-flight connects of a pod too. */
struct wr_pend {
	struct wr_dst dst;
	__u64 netns;
};

/* wr_cidr is the key of the excluded-CIDR LPM trie: prefixlen counts bits of
 * the 16-byte form (an IPv4 /24 is stored as /120 of ::ffff:0:0/96). */
struct wr_cidr {
	__u32 prefixlen;
	struct wr_addr addr;
};

/* wr_exempt_key: a source address exempt from inbound capture in one slot. */
struct wr_exempt_key {
	__u32 slot;
	struct wr_addr addr;
};

/* wr_pod_ip holds an enrolled pod's addresses (key: netns cookie), for
 * getsockname on captured connections. An all-zero address is absent. */
struct wr_podip {
	struct wr_addr v4; /* ::ffff:a.b.c.d */
	struct wr_addr v6;
};

/* wr_tp_key keys wr_tpass: a connect of the agent's transparent socket
 * (SO_MARK wr_cfg_tmark) inside an enrolled pod, from a client's address
 * (src) to an app (dst), between the SYN and ESTABLISHED. sk_lookup lets that
 * SYN reach the app instead of steering it to the inbound listener. */
struct wr_tp_key {
	__u32 slot;
	__u16 sport; /* host order */
	__u16 dport; /* host order */
	struct wr_addr src;
	struct wr_addr dst;
};

/* wr_counters is the one value of the per-CPU wr_stats map: named fields, so
 * bpftool shows them and Go gets the layout through bpf2go -type. */
struct wr_counters {
	__u64 captured;        /* outbound connect rewritten to the listener */
	__u64 pass_mark;       /* agent's own socket (SO_MARK) */
	__u64 pass_local;      /* destination loopback or unspecified */
	__u64 pass_port;       /* destination port excluded */
	__u64 pass_cidr;       /* destination CIDR excluded */
	__u64 orig_add;        /* original destination recorded at ESTABLISHED */
	__u64 orig_del;        /* original destination removed at close */
	__u64 in_captured;     /* inbound SYN steered to the inbound listener */
	__u64 in_pass_local;   /* inbound from loopback or from the pod itself */
	__u64 in_pass_port;    /* inbound to the HBONE port */
	__u64 in_pass_exempt;  /* inbound from an exempt source (kubelet) */
	__u64 err_pending;     /* wr_pending update failed: passed uncaptured */
	__u64 err_orig;        /* wr_orig update failed */
	__u64 err_no_listener; /* enrolled netns has no inbound listener */
	__u64 err_assign;      /* bpf_sk_assign refused the listener */
	__u64 peer_orig;       /* getpeername answered with the original destination */
	__u64 sock_pod;        /* getsockname answered with the pod's address */
	__u64 sock_no_ip;      /* captured connection, but no pod address of its family */
	__u64 tp_add;          /* transparent connect recorded for sk_lookup */
	__u64 in_pass_tp;      /* inbound SYN of the agent's transparent connect passed */
	__u64 err_tp;          /* wr_tpass update failed: that connect is steered (refused) */
};

#endif
