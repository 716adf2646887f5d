"""`python -m sd_scripts_lorax.testing.kohya.measure STATS.json -- CMD...`: run CMD, then write its
wall time and peak resident memory (of the largest process it waited for) to STATS.json and exit
with CMD's status. A process of its own per command, so each stage's peak is its own."""

import json
import resource
import subprocess
import sys
import time


def main() -> int:
    stats, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    with open(stats, "w") as fh:
        json.dump({"wall_s": wall, "peak_rss_gib": peak_kib / 2**20, "returncode": rc}, fh)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
