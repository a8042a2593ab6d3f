"""fastllm's tools/llamalike2flm.py: python3 tools/llamalike2flm.py OUT.flm DTYPE MODEL_PATH

Converts a LLaMA-like Hugging Face model folder with flm's streaming converter; the prompt
template comes from config.json's keys, the family's default or the model's chat_template.
"""

import sys

from flm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    out = args[0] if len(args) > 0 else "llama.flm"
    dtype = args[1] if len(args) > 1 else "float16"
    if len(args) < 3:
        sys.exit("usage: python3 tools/llamalike2flm.py OUT.flm DTYPE MODEL_PATH")
    sys.exit(main(["convert", args[2], "-o", out, "--dtype", dtype]))
