import sys

from cleave.decode.main import run_command

sys.exit(run_command("decode", sys.argv[1:]))
