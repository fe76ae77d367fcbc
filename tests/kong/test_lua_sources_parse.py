"""Every shipped Lua file parses under the LuaJIT of Debian's nginx (the rig's): the Kong plugin, its pongo spec
(kong/spec, run only against a real Kong, never here) and deploy/'s filters. A file the rigs never load, such as the
spec, would otherwise carry a syntax error to whoever runs it next: its mock verifier's `[[ ... ]]` string once ended
early at the `]]` of `ngx.header[names[auth][1]]`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import NGINX, REPO, _module_dir
from support import free_port

pytestmark = pytest.mark.integration

SOURCES = sorted([*(REPO / "kong").rglob("*.lua"), *(REPO / "deploy").rglob("*.lua")])

CONF = """\
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
events {{ worker_connections 16; }}
http {{
    access_log off;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    server {{
        listen 127.0.0.1:{port};
        location / {{
            content_by_lua_block {{
                local errors = {{}}
                for path in io.lines("{tmp}/sources") do
                    local _, err = loadfile(path)
                    if err then errors[#errors + 1] = err end
                end
                ngx.print(table.concat(errors, "\\n"))
            }}
        }}
    }}
}}
"""


def test_every_shipped_lua_file_parses() -> None:
    assert any(p.match("kong/spec/*/*_spec.lua") for p in SOURCES), SOURCES
    modules = _module_dir()
    assert modules is not None
    tmp = Path(tempfile.mkdtemp(prefix="lua-parse-"))
    os.chmod(tmp, 0o755)  # nginx's workers run as nobody under a root master
    (tmp / "sources").write_text("".join(f"{p}\n" for p in SOURCES))
    port = free_port()
    (tmp / "nginx.conf").write_text(CONF.format(tmp=tmp, modules=modules, port=port))
    proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", "nginx.conf", "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        body = b""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                while chunk := s.recv(65536):
                    body += chunk
                break
            time.sleep(0.05)
        assert body, (proc.poll(), (tmp / "error.log").read_text() if (tmp / "error.log").exists() else "")
        assert body.split(b"\r\n\r\n", 1)[1].decode() == ""
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
