from __future__ import annotations

from xdsd.cli import main

raise SystemExit(main())
