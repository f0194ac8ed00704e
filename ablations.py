"""The seed's entry point: `python ablations.py [options]` is `gendiff ablate [options]`."""
import sys

from gendiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
