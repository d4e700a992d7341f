/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map warren uses, defined once. All are pinned by name under the
 * loader's pin directory, so each object (and each restart) shares them. */
#ifndef WR_MAPS_H
#define WR_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "types.h"

#define WR_MAX_PODS 4096
#define WR_MAX_CONNS 65536

/* wr_pods: enrolled network namespaces, keyed by netns cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WR_MAX_PODS);
	__type(key, __u64);
	__type(value, struct wr_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_pods SEC(".maps");

/* wr_pending: the original destination of a captured socket from connect
 * to ESTABLISHED, keyed by socket cookie. LRU: a connect that never
 * completes leaves an entry that ages out (bounded). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WR_MAX_CONNS);
	__type(key, __u64);
	__type(value, struct wr_pend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_pending SEC(".maps");

/* wr_orig: original destinations of established captured connections,
 * read by the agent with the accepted connection's tuple. Removed when the
 * agent's side closes (not the client's: a client that writes and closes at
 * once must not lose its record before the agent reads it); LRU bounds it if
 * the agent never accepts. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WR_MAX_CONNS);
	__type(key, struct wr_tuple);
	__type(value, struct wr_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_orig SEC(".maps");

/* wr_exc_port: destination ports (host order) never captured; value 1 = excluded. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_exc_port SEC(".maps");

/* wr_exc_cidr: destination prefixes never captured. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct wr_cidr);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_exc_cidr SEC(".maps");

/* wr_inbound: the inbound (15006) listener of each enrolled netns, by slot. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, WR_MAX_PODS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_inbound SEC(".maps");

/* wr_exempt: source addresses never steered inbound (kubelet probes), per slot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4 * WR_MAX_PODS);
	__type(key, struct wr_exempt_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_exempt SEC(".maps");

/* wr_pod_ip: an enrolled pod's addresses by netns cookie (getsockname). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WR_MAX_PODS);
	__type(key, __u64);
	__type(value, struct wr_podip);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_pod_ip SEC(".maps");

/* wr_tpass: the agent's transparent connects in flight (sockops adds at
 * connect, removes at ESTABLISHED or close); sk_lookup passes their SYNs.
 * A plain hash, not an LRU: an entry is never evicted under a connect in
 * flight (a full map fails the add, counted, and the agent refuses). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct wr_tp_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_tpass SEC(".maps");

/* wr_stats: counters, one struct wr_counters per CPU at key 0. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct wr_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wr_stats SEC(".maps");

/* WR_COUNT(field) adds one to a counter of this CPU. Atomic: a softirq
 * (sockops, sk_lookup) may interrupt a program counting in process context. */
#define WR_COUNT(field) ({					\
	__u32 __zero = 0;					\
	struct wr_counters *__c = bpf_map_lookup_elem(&wr_stats, &__zero); \
	if (__c)						\
		__sync_fetch_and_add(&__c->field, 1);		\
})

#endif
