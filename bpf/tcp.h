/* Records and keys of the tcp family, shared by tcp.bpf.c and checked against
 * src/probewire/probes/tcp.py through the object's BTF. */
#pragma once

#define TCP_DIR_UNKNOWN 0
#define TCP_DIR_CLIENT 1 /* active open: this host called connect() */
#define TCP_DIR_SERVER 2 /* passive open: accepted on a listening port */

/* Bounded: owner process x direction x server port x remote address (client side only;
 * a server's clients would be unbounded, so their address is left zero). User space folds
 * tgid into a service name; no PID ever becomes a label. */
struct tcp_flow_key {
	__u32 tgid;
	__u16 port;
	__u8 direction;
	__u8 family;
	__u8 raddr[16];
};

struct tcp_flow_stats {
	__u64 opened;
	__u64 closed;
	__u64 failed; /* connect() that never reached ESTABLISHED */
	__u64 retransmits; /* segments, as the kernel's TcpRetransSegs counts them */
	__u64 resets_sent;
	__u64 resets_received;
	__u64 bytes_sent; /* payload bytes acknowledged by the peer */
	__u64 bytes_received; /* payload bytes received in order */
	__u64 duration_us_sum;
	__u64 rtt_us_sum;
	__u64 duration_us_slots[LOG2_SLOTS];
	__u64 rtt_us_slots[LOG2_SLOTS]; /* smoothed RTT at close, one sample per connection */
};

/* Per connection, from open to close; keyed by the struct sock address. */
struct tcp_conn {
	struct tcp_flow_key key;
	__u64 start_ns;
	__u64 base_bytes_acked;
	__u64 base_bytes_received;
	/* tcp_sock.total_retrans already added to the stats: every retransmit event and the close
	 * add what it grew by since, so an event the tracepoint's program missed is not lost. */
	__u32 seen_total_retrans;
	__u32 _pad;
};

struct tcp_listener {
	__u32 tgid;
	__u32 _pad;
	__u64 cgroup_id;
};
