/* MySQL/MariaDB's kernel classifier; mirrored by probewire.l7.protocols.mysql.classify.
 * A connection is MySQL when a call starts with the server's greeting (Handshake v10: the
 * server speaks first) or, picked up mid-stream, with a command packet (sequence id 0) that is
 * all of the call: COM_QUERY/COM_STMT_PREPARE with SQL text, COM_STMT_EXECUTE with one
 * iteration, COM_INIT_DB with a name, COM_PING. */
#pragma once

#include "l7_peek.h"

#define MYSQL_COM_INIT_DB 0x02
#define MYSQL_COM_QUERY 0x03
#define MYSQL_COM_PING 0x0e
#define MYSQL_COM_STMT_PREPARE 0x16
#define MYSQL_COM_STMT_EXECUTE 0x17

static __always_inline bool mysql_greeting(const struct l7_peek *p, __u32 n)
{
	__u32 length = peek_le24(p, 0);

	return n >= 7 && p->data[3] == 0 && p->data[4] == 0x0a && p->data[5] >= '1' &&
	       p->data[5] <= '9' && (p->data[6] == '.' || peek_digit(p->data[6])) &&
	       length >= 40 && length <= 1024;
}

/* No NUL among the valid bytes of the payload from offset 5 (SQL text and names have none). */
static __always_inline bool mysql_no_nul(const struct l7_peek *p, __u32 n, __u32 length)
{
#pragma unroll
	for (int i = 5; i < L7_PEEK; i++) {
		if (i >= n || i >= length + 4)
			break;
		if (p->data[i] == 0)
			return false;
	}
	return true;
}

static __always_inline __u8 mysql_classify(const struct l7_peek *p)
{
	__u32 n = peek_len(p), length;
	__u8 cmd, c;
	bool command = false;

	if (p->transport != L7_TCP || n < 5)
		return L7_ROLE_UNKNOWN;
	if (mysql_greeting(p, n))
		return p->dir == L7_DIR_OUT ? L7_ROLE_SERVER : L7_ROLE_CLIENT;
	length = peek_le24(p, 0);
	if (p->data[3] != 0 || length + 4 != peek_call_len(p))
		return L7_ROLE_UNKNOWN;
	cmd = p->data[4];
	c = p->data[5];
	if (cmd == MYSQL_COM_QUERY || cmd == MYSQL_COM_STMT_PREPARE)
		command = length >= 2 && n >= 6 && peek_sql_start(c) && mysql_no_nul(p, n, length);
	else if (cmd == MYSQL_COM_STMT_EXECUTE)
		command = length >= 10 && n >= 14 && p->data[9] < 0x20 && p->data[10] == 1 &&
			  p->data[11] == 0 && p->data[12] == 0 && p->data[13] == 0;
	else if (cmd == MYSQL_COM_INIT_DB)
		command = length >= 2 && n >= 6 && mysql_no_nul(p, n, length) &&
			  (peek_alpha(c) || peek_digit(c) || c == '_' || c == '$');
	else if (cmd == MYSQL_COM_PING)
		command = length == 1;
	return command ? peek_request_role(p) : L7_ROLE_UNKNOWN;
}
