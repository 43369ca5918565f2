"""python -m mlx_diffgemma.native build [--force] | status: compile the native CPU kernels, or say whether they load."""

from __future__ import annotations

import sys

from . import BuildError, build, cache_dir, describe


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "status") or any(a not in ("--force",) for a in argv[1:]):
        print("usage: python -m mlx_diffgemma.native build [--force] | status", file=sys.stderr)
        return 2
    if argv[0] == "build":
        try:
            path = build(force="--force" in argv)
        except BuildError as e:
            print(f"error: native CPU kernels not built: {e}", file=sys.stderr)
            return 1
        print(f"built {path}")
    else:
        print(f"cache: {cache_dir()}")
    print(f"native CPU kernels: {describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
