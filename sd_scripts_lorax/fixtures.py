"""`python -m sd_scripts_lorax.fixtures`: kept as a documented entry point; see testing/fixtures.py."""

from .testing.fixtures import main

if __name__ == "__main__":
    raise SystemExit(main())
