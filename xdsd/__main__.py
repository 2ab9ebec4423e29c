from __future__ import annotations

from xdsd.cli import main

if __name__ == "__main__":  # not when a worker process (ext_proc's pool, spawned) imports it
    raise SystemExit(main())
