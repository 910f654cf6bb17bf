"""`python -m serve_app.launch CONFIG`: `serve run CONFIG`, then say how to call it.

Used by `make run`: it starts the real `serve run` CLI, waits until /ready answers 200,
prints a ready-to-paste curl, and stops the server on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

# fmt: off
_SAVE_B64 = (
    "import sys,json,base64; "
    "open('out.png','wb').write(base64.b64decode(json.load(sys.stdin)['data'][0]['b64_json']))"
)
# fmt: on
_EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "input.png"


def _base_url(config_path: Path) -> str:
    cfg = yaml.safe_load(config_path.read_text())
    http = cfg.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{http.get('port', 8000)}"


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def banner(url: str) -> str:
    image = _EXAMPLE_IMAGE if _EXAMPLE_IMAGE.exists() else Path("input.png")
    return f"""
================================================================================
 qwen-image-edit-serve is ready on {url}
 Try it (writes out.png):

 curl -s {url}/v1/images/edits \\
   -F model=qwen-image-edit -F image=@{image} \\
   -F prompt="make the sky purple" -F size=256x256 \\
   | python3 -c "{_SAVE_B64}"

 Ctrl-C stops the server.
================================================================================
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    url = _base_url(args.config)
    serve_cli = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
    env = {**os.environ}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    proc = subprocess.Popen([serve_cli, "run", str(args.config)], env=env)
    try:
        deadline = time.monotonic() + args.ready_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _is_ready(url):
                print(banner(url), flush=True)
                break
            time.sleep(1.0)
        else:
            if proc.poll() is None:
                print(f"server not ready after {args.ready_timeout:.0f} s", file=sys.stderr)
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
