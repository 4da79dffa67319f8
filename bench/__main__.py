"""Entry point of ``python -m bench`` (run from the repository root)."""
from .kl import main

raise SystemExit(main())
