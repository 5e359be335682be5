// SPDX-License-Identifier: GPL-2.0
// Per-peer TCP telemetry from sock_ops callbacks, keyed by remote address (IPv4 mapped into
// IPv6). Userspace reads PEERS; SOCKS is this program's per-socket bookkeeping.
//
// The layouts of `struct peer_key` and `struct peer_stats` are mirrored in src/probes.rs:
// change both together.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10

// Keeps clang from merging or re-deriving context loads: the verifier rejects a context
// access through a computed pointer ("dereference of modified ctx ptr").
#define barrier() asm volatile("" ::: "memory")

struct peer_key {
	__u8 addr[16];
};

struct peer_stats {
	__u64 srtt_us;          // smoothed RTT of the socket that reported last
	__u64 min_rtt_us;       // the kernel's windowed minimum RTT of that socket
	__u64 connect_ns;       // duration of the last successful active connect, 0 if none
	__u64 connects;         // active connect attempts (TCP_CONNECT_CB)
	__u64 connect_failures; // attempts that reached CLOSE without ESTABLISHED
	__u64 retransmits;      // segments retransmitted
	__u64 rto_events;       // retransmission timeouts
	__u64 bytes_acked;      // bytes we sent that the peer acknowledged
	__u64 bytes_received;   // bytes received from the peer
	__u64 last_seen_ns;     // bpf_ktime_get_ns of the last callback
};

struct sock_state {
	struct peer_key peer;
	__u64 connect_start_ns; // 0 for a passive (accepted) socket
	__u64 acked_seen;       // part of bytes_acked already added to the peer
	__u64 received_seen;
	__u32 retrans_seen;
	__u8 established;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct peer_key);
	__type(value, struct peer_stats);
} PEERS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); // socket cookie
	__type(value, struct sock_state);
} SOCKS SEC(".maps");

#define CB_FLAGS (BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG)

static __always_inline int read_peer(struct bpf_sock_ops *skops, struct peer_key *key)
{
	__u32 family = skops->family;
	barrier();
	if (family == AF_INET) {
		__u32 ip4 = skops->remote_ip4;
		barrier();
		__builtin_memset(key, 0, sizeof(*key));
		key->addr[10] = 0xff;
		key->addr[11] = 0xff;
		__builtin_memcpy(&key->addr[12], &ip4, 4);
		return 0;
	}
	if (family == AF_INET6) {
		__u32 a = skops->remote_ip6[0];
		barrier();
		__u32 b = skops->remote_ip6[1];
		barrier();
		__u32 c = skops->remote_ip6[2];
		barrier();
		__u32 d = skops->remote_ip6[3];
		barrier();
		__builtin_memcpy(&key->addr[0], &a, 4);
		__builtin_memcpy(&key->addr[4], &b, 4);
		__builtin_memcpy(&key->addr[8], &c, 4);
		__builtin_memcpy(&key->addr[12], &d, 4);
		return 0;
	}
	return -1;
}

static __always_inline struct peer_stats *peer_entry(struct peer_key *key)
{
	struct peer_stats *p = bpf_map_lookup_elem(&PEERS, key);
	if (p)
		return p;
	struct peer_stats zero = {};
	bpf_map_update_elem(&PEERS, key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&PEERS, key);
}

// Adds what the socket's cumulative counters grew by since the last callback.
static __always_inline void credit(struct bpf_sock_ops *skops, struct sock_state *s,
				   struct peer_stats *p)
{
	__u64 acked = skops->bytes_acked;
	barrier();
	__u64 received = skops->bytes_received;
	barrier();
	__u32 retrans = skops->total_retrans;
	barrier();
	if (acked > s->acked_seen) {
		__sync_fetch_and_add(&p->bytes_acked, acked - s->acked_seen);
		s->acked_seen = acked;
	}
	if (received > s->received_seen) {
		__sync_fetch_and_add(&p->bytes_received, received - s->received_seen);
		s->received_seen = received;
	}
	if (retrans > s->retrans_seen) {
		__sync_fetch_and_add(&p->retransmits, (__u64)(retrans - s->retrans_seen));
		s->retrans_seen = retrans;
	}
}

static __always_inline void record_rtt(struct bpf_sock_ops *skops, struct peer_stats *p)
{
	__u32 srtt = skops->srtt_us;
	barrier();
	__u32 min_rtt = skops->rtt_min;
	barrier();
	if (srtt)
		p->srtt_us = srtt >> 3;
	if (min_rtt && min_rtt != ~0U)
		p->min_rtt_us = min_rtt;
}

SEC("sockops")
int peer_tcp(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	barrier();
	struct peer_key key;
	struct sock_state fresh = {};
	struct sock_state *s;
	struct peer_stats *p;
	__u64 cookie, now;

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_RTT_CB:
	case BPF_SOCK_OPS_RTO_CB:
	case BPF_SOCK_OPS_STATE_CB:
		break;
	default:
		return 1;
	}

	cookie = bpf_get_socket_cookie(skops);
	now = bpf_ktime_get_ns();

	s = bpf_map_lookup_elem(&SOCKS, &cookie);
	if (s) {
		key = s->peer;
	} else {
		if (read_peer(skops, &key) < 0)
			return 1;
	}
	p = peer_entry(&key);
	if (!p)
		return 1;
	p->last_seen_ns = now;

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		fresh.peer = key;
		fresh.connect_start_ns = now;
		bpf_map_update_elem(&SOCKS, &cookie, &fresh, BPF_ANY);
		__sync_fetch_and_add(&p->connects, 1);
		// Set here, not on ESTABLISHED, so that a connect that fails is seen closing.
		bpf_sock_ops_cb_flags_set(skops, CB_FLAGS);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!s) {
			fresh.peer = key;
			bpf_map_update_elem(&SOCKS, &cookie, &fresh, BPF_ANY);
			s = bpf_map_lookup_elem(&SOCKS, &cookie);
			if (!s)
				return 1;
		}
		if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && s->connect_start_ns &&
		    now > s->connect_start_ns)
			p->connect_ns = now - s->connect_start_ns;
		s->established = 1;
		record_rtt(skops, p);
		credit(skops, s, p);
		bpf_sock_ops_cb_flags_set(skops, CB_FLAGS);
		return 1;
	case BPF_SOCK_OPS_RTT_CB:
		record_rtt(skops, p);
		if (s)
			credit(skops, s, p);
		return 1;
	case BPF_SOCK_OPS_RTO_CB:
		__sync_fetch_and_add(&p->rto_events, 1);
		if (s)
			credit(skops, s, p);
		return 1;
	case BPF_SOCK_OPS_STATE_CB: {
		__u32 new_state = skops->args[1];
		barrier();
		if (!s)
			return 1;
		credit(skops, s, p);
		if (new_state == BPF_TCP_CLOSE) {
			if (s->connect_start_ns && !s->established)
				__sync_fetch_and_add(&p->connect_failures, 1);
			bpf_map_delete_elem(&SOCKS, &cookie);
		}
		return 1;
	}
	}
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
