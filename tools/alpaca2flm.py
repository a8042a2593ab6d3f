"""fastllm's tools/alpaca2flm.py: python3 tools/alpaca2flm.py OUT.flm DTYPE MODEL_PATH

Like llamalike2flm.py but with fastllm's alpaca prompt unless config.json sets its own strings.
"""

import sys

from flm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 3:
        sys.exit("usage: python3 tools/alpaca2flm.py OUT.flm DTYPE MODEL_PATH")
    sys.exit(main(["convert", args[2], "-o", args[0], "--dtype", args[1], "--template", "alpaca"]))
