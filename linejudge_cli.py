"""Console entry point: `linejudge` (also `python -m linejudge_cli`)."""
import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
