"""A digest of everything the extension is built from: csrc/ and setup.py.

setup.py records it in batchkl_ext/_build_config.py (SOURCES), so that a
build made elsewhere (scripts/prebuild_gpu.sh, for a lent GPU machine) is used
only for exactly the sources it was built from.

  python scripts/sources_digest.py                 # print the digest of this tree
  python scripts/sources_digest.py --matches FILE  # exit 0 if FILE (a _build_config.py) records it
"""
import argparse
import hashlib
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scratch(name):
    """Editor and tool leftovers (.swp, backups, caches) that no build reads."""
    return name.startswith(".") or name.endswith(("~", ".orig", ".rej")) or name == "__pycache__"


def digest(root=ROOT):
    h = hashlib.sha256()
    paths = [os.path.join(root, "setup.py")]
    for base, dirs, files in os.walk(os.path.join(root, "csrc")):
        dirs[:] = sorted(d for d in dirs if not _scratch(d))
        paths += [os.path.join(base, f) for f in sorted(files) if not _scratch(f)]
    for path in paths:
        # The path is hashed too: a renamed file changes what is built.
        h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matches", metavar="FILE", help="a _build_config.py whose SOURCES must equal the digest")
    args = parser.parse_args(argv)
    mine = digest()
    if args.matches is None:
        print(mine)
        return 0
    recorded = runpy.run_path(args.matches).get("SOURCES")
    if recorded != mine:
        print(f"{args.matches} was built from other sources ({recorded}; this tree: {mine})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
