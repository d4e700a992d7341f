/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The few socket constants warren needs, without libc headers. */
#ifndef WR_NET_H
#define WR_NET_H

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef IPPROTO_TCP
#define IPPROTO_TCP 6
#endif

#endif
