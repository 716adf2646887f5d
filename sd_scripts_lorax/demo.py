"""`python -m sd_scripts_lorax.demo`: kept as a documented entry point; the demo is tools/demo.py."""

from .tools.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
