/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Load-time configuration: constants the loader sets before loading
 * (volatile const lands in .rodata; the verifier prunes on them). */
#ifndef WR_CONFIG_H
#define WR_CONFIG_H

#include <linux/types.h>

/* SO_MARK of the agent's own sockets: never captured. */
volatile const __u32 wr_cfg_mark = 0x539;
/* SO_MARK of the agent's transparent sockets (connects to an app from a
 * client's address): never captured either, and passed by sk_lookup. */
volatile const __u32 wr_cfg_tmark = 0x53a;
/* Non-zero when wr_exc_cidr has entries: an empty trie costs nothing. */
volatile const __u32 wr_cfg_cidrs = 0;

#endif
