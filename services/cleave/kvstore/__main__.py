import sys

from cleave.kvstore.main import run_command

sys.exit(run_command("kvstore", sys.argv[1:]))
