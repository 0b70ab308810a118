import sys

from cleave.prefill.main import run_command

sys.exit(run_command("prefill", sys.argv[1:]))
